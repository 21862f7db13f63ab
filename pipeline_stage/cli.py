"""The `pipeline-stage` command. Errors become one message and an exit code here, and only here.

Exit codes: 0 success; 1 a retry may succeed (tracking server or object store unreachable);
2 bad input, or an answer a retry would repeat (manifest, URIs, params, data, a model no chain
takes); 3 a gate failed (nothing promoted); 4 a plugin or the stage failed unexpectedly (a bug).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from pipeline_stage.contract.errors import GATE_FAILED_EXIT, UNEXPECTED_EXIT, StageError
from pipeline_stage.version import __version__


class StageGroup(click.Group):
    """Turns StageError into `error: ...` on stderr and its exit code; anything else into exit 4."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except StageError as exc:
            notes = "".join(f"\n  note: {note}" for note in getattr(exc, "__notes__", []))
            _fail(str(exc) + notes, exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:  # an unexpected failure still gets one line, and the exit code of a bug
            if os.environ.get("PIPELINE_STAGE_DEBUG"):
                traceback.print_exc()
            from pipeline_stage.mlflow_io.tracking import redact

            _fail(
                f"unexpected failure: {type(exc).__name__}: {redact(str(exc)).splitlines()[0] if str(exc) else ''}"
                "\n  (set PIPELINE_STAGE_DEBUG=1 for the traceback)",
                UNEXPECTED_EXIT,
            )


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(cls=StageGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pipeline-stage")
def cli() -> None:
    """Optimize a trained model from MLflow into a gated, registered TFLite model.

    \b
    Exit codes: 0 success, 1 a retry may succeed (tracking server, object store),
                2 bad input or a model no chain takes (a retry repeats it),
                3 a gate failed, 4 a plugin or the stage failed (a bug: report it).
    """


def _host():
    from pipeline_stage.host.plugin_host import get_host

    return get_host()


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=str))
@click.option("--model-uri", help="Source model; overrides the manifest's `model:` (Kubeflow passes it).")
def validate(manifest: str, model_uri: str | None) -> None:
    """Check MANIFEST without running anything (no TensorFlow import).

    Checks YAML syntax, fields, step names and params, phase order, metrics, gates, data needs and
    URI shapes; prints the resolved chain.
    """
    from pipeline_stage.manifest import load_manifest

    loaded = load_manifest(manifest, _host(), model_uri=model_uri, read_data=True)
    click.echo(f"{manifest}: ok (chain digest {loaded.chain_digest})")
    for i, step in enumerate(loaded.steps):
        params = ", ".join(f"{k}={v}" for k, v in step.params.model_dump(mode="json").items())
        click.echo(f"  {i + 1}. {step.name} [{step.phase.value}] {params}")
    search = loaded.manifest.search
    if search is not None:
        click.echo(
            f"  search: {search.strategy}, objective {', '.join(search.objective)}, "
            f"up to {search.budget.trials} trials / {search.budget.seconds:g} s"
        )
        for k, chain in enumerate(loaded.candidates):
            click.echo(f"    candidate {k + 1}: {' -> '.join(s.name for s in chain)}")
    for target in loaded.compile_targets:
        options = ", ".join(f"{k}={v}" for k, v in target.options.model_dump(mode="json").items())
        click.echo(f"  compile: {target.name}" + (f" ({options})" if options else ""))


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=str))
@click.option("--model-uri", help="Source model; overrides the manifest's `model:`.")
@click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the JSON report here (and a Markdown one next to it).",
)
@click.option(
    "--output", "output_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the optimized .tflite here."
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep intermediate files here (default: a temporary folder, removed afterwards).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
@click.option(
    "--new-version",
    is_flag=True,
    help="Register a new version even if a passing one exists for the same source version and chain.",
)
def run(
    manifest: str,
    model_uri: str | None,
    tracking_uri: str | None,
    report_path: Path | None,
    output_path: Path | None,
    workdir: Path | None,
    quiet: bool,
    new_version: bool,
) -> None:
    """Run the stage described by MANIFEST.

    Loads the model, runs the chain, converts once, evaluates candidate vs baseline, applies the
    gates and registers the .tflite in MLflow (the alias moves only when every gate passes).
    A re-run on the same source version and chain reuses the version it registered before.
    """
    from pipeline_stage.manifest import load_manifest
    from pipeline_stage.mlflow_io.tracking import resolve_tracking_uri
    from pipeline_stage.run.stage import RunOptions, run_stage

    host = _host()
    loaded = load_manifest(manifest, host, model_uri=model_uri)
    options = RunOptions(
        tracking_uri=resolve_tracking_uri(tracking_uri),
        report_path=report_path,
        output_path=output_path,
        workdir=workdir,
        quiet=quiet,
        new_version=new_version,
    )
    _conclude(run_stage(loaded, host, options), options.tracking_uri)


def _conclude(report, tracking_uri: str) -> None:
    """Print the summary; a failed gate is exit 3 with the gates that failed (nothing promoted)."""
    from pipeline_stage.reporting.summary import print_summary

    print_summary(report, tracking_uri)
    if not report.passed:
        _fail(report.failure_message(), GATE_FAILED_EXIT)


@cli.command()
@click.argument("model_uri")
@click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
def verify(model_uri: str, tracking_uri: str | None) -> None:
    """Check that MODEL_URI's stored files are the ones the stage registered.

    MODEL_URI is models:/NAME/N, models:/NAME@ALIAS or runs:/RUN_ID[/PATH]. Every stored copy (the
    logged model's files and the run's .tflite) is downloaded and its sha256 compared with the
    digests recorded on the version's (or run's) tags. Exit 0 when all match; 2 naming each file
    that differs, is missing or is not recorded, with both digests; 1 when the server fails.
    """
    import mlflow

    from pipeline_stage.mlflow_io.integrity import verify_uri
    from pipeline_stage.mlflow_io.tracking import configure, preflight, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    configure(uri)
    preflight(uri)
    verdict = verify_uri(mlflow.MlflowClient(), model_uri)
    for f in verdict.checked:
        click.echo(f"  {f.path}  sha256 {f.sha256}  {f.size} bytes")
    verdict.raise_if_bad("verify")
    click.echo(f"{verdict.subject}: ok ({len(verdict.checked)} files match their recorded sha256)")


def _echo_params(params: list[dict], prefix: str = "") -> None:
    """A plugin's params as `plugins` lists them, one line each under its entry."""
    for p in params:
        default = "required" if p["required"] else f"default {json.dumps(p['default'])}"
        click.echo(f"      {prefix}{p['name']}: {p['type']} ({default}) {p['doc']}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a listing.")
def plugins(as_json: bool) -> None:
    """List installed model sources, quantization engines, accelerator compilers, steps (phase,
    params, distribution), metrics, search moves, data loaders and plugins."""
    from pipeline_stage.host.plugin_listing import describe

    info = describe(_host())
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo("Model sources (asked in this order):")
    for source in info["sources"]:
        reads = ", ".join([*(f"flavor {f}" for f in source["flavors"]), *source["suffixes"]]) or "by its files"
        click.echo(f"  {source['name']} ({reads}) from {source['distribution']}: {source['summary']}")
    click.echo("Quantization engines:")
    for engine in info["engines"]:
        click.echo(
            f"  {engine['name']} (modes {', '.join(engine['modes']) or 'any'}; sources {', '.join(engine['source_kinds'])})"
            f" from {engine['distribution']}: {engine['summary']}"
        )
        _echo_params(engine["options"], "options.")
    if info["compilers"]:
        click.echo("Accelerator compilers (compile.targets: <name>/<soc>):")
        for comp in info["compilers"]:
            click.echo(
                f"  {comp['name']} (SoCs {', '.join(comp['socs'])}; needs {comp['sdk']}) from {comp['distribution']}: {comp['summary']}"
            )
            _echo_params(comp["options"], "options.")
    if info["custom_ops"]:
        click.echo("Custom ops (kernels the interpreter loads):")
        for op in info["custom_ops"]:
            click.echo(f"  {op['op']} ({op['registerer']}) from {op['plugin']}")
    click.echo("Steps:")
    for step in info["steps"]:
        click.echo(f"  {step['name']} [{step['phase']}] from {step['distribution']}: {step['summary']}")
        _echo_params(step["params"])
        if step["support"]:
            click.echo("      supported:")
            click.echo(_text_table(step["support"], indent="      "))
    click.echo("Metrics:")
    for metric in info["metrics"]:
        direction = "higher is better" if metric["higher_is_better"] else "lower is better"
        click.echo(f"  {metric['name']} ({direction}) from {metric['distribution']}: {metric['summary']}")
    click.echo("Search moves (strategy auto):")
    for move in info["search_moves"]:
        click.echo(f"  {move['name']} [{move['kind']}, cost {move['cost']:g}] from {move['distribution']}: {move['summary']}")
    click.echo("Data loaders:")
    for loader in info["data_loaders"]:
        click.echo(f"  {loader['name']} {' '.join(loader['suffixes'])} from {loader['distribution']}")
    click.echo("Plugins:")
    for plugin in info["plugins"]:
        click.echo(f"  {plugin['name']} ({plugin['distribution']}): {', '.join(plugin['hooks'])}")


def _text_table(rows: list[dict[str, str]], *, indent: str) -> str:
    """Rows of equal keys as an aligned plain-text table."""
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = [" | ".join(k.ljust(widths[k]) for k in keys)] + [" | ".join(str(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(indent + line.rstrip() for line in lines)


@cli.command()
@click.option("--report", "of_report", is_flag=True, help="The schema of report.json instead of the manifest's.")
def schema(of_report: bool) -> None:
    """Print the manifest's JSON Schema (installed steps included), for editor completion.

    With --report, the JSON Schema of report.json (what `run --report` writes and the run logs).
    """
    if of_report:
        from pipeline_stage.contract.report import Report

        click.echo(
            json.dumps({"$schema": "https://json-schema.org/draft/2020-12/schema", **Report.model_json_schema()}, indent=2)
        )
        return
    from pipeline_stage.manifest import manifest_json_schema

    click.echo(json.dumps(manifest_json_schema(_host()), indent=2))


@cli.command()
@click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("demo-report.json"),
    show_default=True,
    help="Where to write the JSON report.",
)
@click.option("--epochs", default=None, type=int, help="Training epochs (default: 12 for int8, 8 for search).")
@click.option(
    "--case",
    type=click.Choice(["int8", "search"]),
    default="int8",
    show_default=True,
    help="int8: the digits CNN and digits-int8.yaml. search: the BatchNorm-after-ReLU CNN whose plain int8 "
    "collapses, and search-auto.yaml, which finds a chain that passes.",
)
def demo(tracking_uri: str | None, report_path: Path, epochs: int | None, case: str) -> None:
    """Train a small model on offline digits, log it to MLflow, and run an example manifest on it.

    `--case int8` (default): a small CNN and digits-int8.yaml. `--case search`: the BatchNorm-after-ReLU
    CNN on raw-pixel digits, where plain int8 fails its accuracy gate, and search-auto.yaml.
    """
    from pipeline_stage import demo as demo_mod
    from pipeline_stage.manifest import load_manifest
    from pipeline_stage.mlflow_io.tracking import configure, preflight, resolve_tracking_uri
    from pipeline_stage.run.phase_clock import process_age_s
    from pipeline_stage.run.stage import RunOptions, run_stage

    startup = process_age_s()  # the stage's start-up is this, not this plus the demo's training
    host = _host()
    manifest = demo_mod.example_manifest("search-auto.yaml" if case == "search" else demo_mod.EXAMPLE_MANIFEST)
    load_manifest(manifest, host)  # a broken example fails before any training
    uri = resolve_tracking_uri(tracking_uri)
    configure(uri)
    preflight(uri)
    click.echo(f"[demo] tracking: {uri}", err=True)
    if case == "search":
        data = demo_mod.raw_digits_data()
        epochs = epochs or 8
        click.echo(f"[demo] training a CNN with BatchNorm after ReLU on raw-pixel 16x16 digits ({epochs} epochs) ...", err=True)
        model = demo_mod.train_bn_after_relu_cnn(data, epochs=epochs)
        source = demo_mod.log_source_model(model, data, name="digits-bn-raw")
    else:
        data = demo_mod.digits_data()
        epochs = epochs or 12
        click.echo(f"[demo] training a small CNN on sklearn digits ({len(data.train[0])} images, {epochs} epochs) ...", err=True)
        model = demo_mod.train_digits_cnn(data, epochs=epochs)
        source = demo_mod.log_source_model(model, data)
    click.echo(
        f"[demo] logged {source['uri']} (version {source['version']}, held-out accuracy {source['accuracy']:.4f})", err=True
    )
    loaded = load_manifest(manifest, host, model_uri=source["uri"])
    click.echo(f"[demo] running {manifest} ...", err=True)
    _conclude(run_stage(loaded, host, RunOptions(tracking_uri=uri, report_path=report_path, startup_s=startup)), uri)


def main() -> None:
    """The console script. Once a command has finished (files written and closed, the MLflow run
    ended), the process leaves without the interpreter's teardown: TensorFlow's and MLflow's take
    about a second and do nothing for a finished command (bench/RESULTS.md)."""
    try:
        cli.main(prog_name="pipeline-stage")  # standalone: always ends in SystemExit
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            click.echo(exc.code, err=True)
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
