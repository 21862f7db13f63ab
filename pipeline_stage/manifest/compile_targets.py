"""The manifest's `compile` section resolved: each target's installed compiler, its SoC checked
against the compiler's list, its options validated by the compiler's own schema."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pipeline_stage.contract.compilers import AcceleratorCompiler
from pipeline_stage.contract.errors import ManifestError
from pipeline_stage.contract.steps import Params
from pipeline_stage.host.plugin_host import PluginHost
from pipeline_stage.manifest.field_errors import did_you_mean, pydantic_error
from pipeline_stage.manifest.schema import CompileTarget, Manifest
from pipeline_stage.manifest.yaml_text import fmt_loc, line_for


@dataclass(frozen=True)
class AcceleratorTarget:
    """One target to compile for: its compiler, SoC and options."""

    compiler: AcceleratorCompiler
    soc: str
    options: Params

    @property
    def name(self) -> str:
        """`<compiler>/<soc>`, as the manifest writes it."""
        return f"{self.compiler.name}/{self.soc}"

    @property
    def key(self) -> str:
        """`<compiler>_<soc>`: the target in file names, tags and metric names."""
        return f"{self.compiler.name}_{self.soc}"

    def digest_view(self) -> list[Any]:
        return [self.name, self.options.digest_view()]


def resolve_targets(manifest: Manifest, host: PluginHost, path: str, lines: dict) -> list[AcceleratorTarget]:
    """The `compile` section's targets, resolved; a ManifestError naming the field for an unknown
    compiler or SoC, bad options, or a target named twice."""
    if manifest.compile is None:
        return []
    targets: list[AcceleratorTarget] = []
    for i, entry in enumerate(manifest.compile.targets):
        spec = entry if isinstance(entry, CompileTarget) else None
        text = spec.target if spec is not None else entry
        loc = ("compile", "targets", i) + (("target",) if spec is not None else ())

        def error(message: str, hint: str | None = None, at: tuple = loc) -> ManifestError:
            return ManifestError(message, path=path, line=line_for(lines, at), field=fmt_loc(at), hint=hint)

        if "/" not in text:
            raise error(f"compile target `{text}` is not `<compiler>/<soc>`", hint="e.g. `intel_openvino/LNL`")
        vendor, soc = text.split("/", 1)
        provided = host.compilers.get(vendor)
        if provided is None:
            known = sorted(host.compilers)
            raise error(
                f"unknown accelerator compiler `{vendor}`; installed: {', '.join(known) or 'none'}",
                hint=did_you_mean(vendor, known) or "install the plugin that provides it (`pipeline-stage plugins` lists them)",
            )
        compiler = provided.cls()
        if soc not in compiler.socs:
            raise error(
                f"`{vendor}` does not compile for SoC `{soc}`; it knows: {', '.join(compiler.socs)}",
                hint=did_you_mean(soc, list(compiler.socs)),
            )
        try:
            options = compiler.Params.model_validate(spec.options if spec is not None else {})
        except ValidationError as exc:
            raise pydantic_error(
                exc, compiler.Params, path, lines, prefix=("compile", "targets", i, "options"), what=f" for compiler `{vendor}`"
            ) from None
        target = AcceleratorTarget(compiler, soc, options)
        if any(t.name == target.name for t in targets):
            raise error(f"compile target `{target.name}` is named twice", hint="name each target once")
        targets.append(target)
    return targets
