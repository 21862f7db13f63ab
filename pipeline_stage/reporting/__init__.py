"""Reporting: the typed report rendered for people (report.md, report.html, the console summary)."""
