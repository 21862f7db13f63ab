"""Validation errors as the manifest's reader says them: a pydantic error turned into a
ManifestError naming the file, line and field, and the "did you mean" hint for a misspelled name."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline_stage.contract.errors import ManifestError
from pipeline_stage.manifest.yaml_text import fmt_loc, line_for


def did_you_mean(word: str, options: list[str]) -> str | None:
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


def pydantic_error(
    exc: ValidationError, model: type[BaseModel], path: str, lines: dict, prefix: tuple = (), what: str = ""
) -> ManifestError:
    err = exc.errors()[0]
    loc = prefix + tuple(err["loc"])
    field = fmt_loc(loc)
    line = line_for(lines, loc)
    more = len(exc.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if err["type"] == "extra_forbidden":
        owner: Any = model
        for part in err["loc"][:-1]:
            fld = getattr(owner, "model_fields", {}).get(part)
            ann = getattr(fld, "annotation", None) if fld else None
            owner = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if owner is None:
                break
        # the names a manifest writes: a field's alias where it has one (`register`)
        options = [f.alias or name for name, f in getattr(owner, "model_fields", {}).items()]
        hint = did_you_mean(err["loc"][-1], options) or (f"known fields: {', '.join(options)}" if options else None)
        return ManifestError(f"unknown field{what}{tail}", path=path, line=line, field=field, hint=hint)
    found = err.get("input")
    found_txt = f" (found {found!r})" if not isinstance(found, (dict, list)) and err["type"] != "missing" else ""
    return ManifestError(f"{err['msg']}{what}{found_txt}{tail}", path=path, line=line, field=field)
