"""A validated manifest: its typed sections, its configured steps, and what follows from them
(the chain digest, the metrics a run measures, the data sets it needs)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from pipeline_stage.contract.steps import Step
from pipeline_stage.host.plugin_host import PluginHost
from pipeline_stage.manifest.schema import Manifest


def digest_json(steps: list[Step]) -> list[list[Any]]:
    """A chain as its digest counts it: each step's name and :meth:`~pipeline_stage.contract.steps.Params.digest_view`."""
    return [[s.name, s.params.digest_view()] for s in steps]


def digest(chain: Any, signature: str = "serving_default", io_layout: str = "source") -> str:
    """The chain digest of `chain` (:func:`digest_json`, or a search's whole spec) on a signature,
    registered in an I/O layout."""
    if signature != "serving_default":  # another signature is another model
        chain = {"chain": chain, "signature": signature}
    if io_layout != "source":  # so is the same model with its inputs in another layout
        chain = {"chain": chain, "io_layout": io_layout}
    return hashlib.sha256(json.dumps(chain, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LoadedManifest:
    """A validated manifest with its configured steps."""

    path: str
    manifest: Manifest
    steps: list[Step]
    raw: dict[str, Any]
    text: str
    lines: dict[tuple, int]
    candidates: list[list[Step]] = dc_field(default_factory=list)  # search.candidates, configured
    moves: list[str] = dc_field(default_factory=list)  # the search moves it may use, by name (all installed by default)
    digest_moves: list[str] = dc_field(default_factory=list)  # those the chain digest counts (see loader._digest_moves)
    compile_targets: list[Any] = dc_field(default_factory=list)  # compile.targets, resolved (AcceleratorTarget)

    @property
    def chain_digest(self) -> str:
        """Digest of the chain as it will run (names and params with defaults filled in, as
        :func:`digest_json` counts them)."""
        chain: Any = digest_json(self.steps)
        if self.manifest.search is not None:  # a search may register another chain: its whole spec counts
            search = self.manifest.search.model_dump(mode="json", exclude={"candidates"})
            search["moves"] = self.digest_moves  # what it may do, whether written or by default
            chain = {
                "chain": chain,
                "search": search,
                "candidates": [digest_json(c) for c in self.candidates],
            }
        if self.compile_targets:  # the version holds the compiled models too
            chain = {"chain": chain, "compile": [t.digest_view() for t in self.compile_targets]}
        return digest(chain, self.manifest.signature, self.manifest.conversion.io_layout)

    def required_data(self, host: PluginHost) -> set[str]:
        """The data sets the steps need, and `evaluation` for metrics computed on predictions."""
        needed: set[str] = set()
        for step in [*self.steps, *(s for chain in self.candidates for s in chain)]:
            needed |= step.required_data()
        for name in self.metric_names() + list(self.manifest.evaluation.per_step):
            found = host.metric_for(name)
            if found is not None and (found[0].cls.needs_labels or found[0].cls.uses == "predictions"):
                needed.add("evaluation")
        return needed

    def measured_names(self) -> list[str]:
        """Every metric a run may measure (per step too); a default list asks for accuracy only when
        the data turns out to have labels, so it is left out here."""
        return self.metric_names(labels=False) + list(self.manifest.evaluation.per_step)

    def needing_labels(self, host: PluginHost) -> list[str]:
        """The measured metrics that need the evaluation data's labels."""
        return [n for n in self.measured_names() if host.metric_class(n).needs_labels]

    def metric_names(self, *, labels: bool = True) -> list[str]:
        """The metrics measured for baseline and candidate: the manifest's list (default: accuracy when
        the evaluation data has labels, fidelity to the baseline when there is evaluation data, size,
        and latency when there is any data to time the model on), plus every gated and objective metric."""
        names = self.manifest.evaluation.metrics
        if names is None:
            data = self.manifest.data
            names = (["accuracy"] if data.evaluation and labels else []) + (["fidelity_sqnr_db"] if data.evaluation else [])
            names += ["size_bytes"] + (["latency_p50_ms"] if data.evaluation or data.calibration or data.training else [])
        names = list(names)
        extra = [g.metric for g in self.manifest.gates] + (self.manifest.search.objective if self.manifest.search else [])
        for name in extra:
            if name not in names:
                names.append(name)
        return names
