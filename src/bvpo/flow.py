"""The Prefect flow: the stages as tasks, one MLflow parent run, registration at the end.

Stage logic lives in `bvpo.stages`; a task only asks DVC to bring its stage up to date
(`dvc repro --single-item <stage>`), so DVC decides what is stale, records dvc.lock, and a
later `dvc repro` has nothing to do. Outside a DVC repository the task runs the same stage
through `bvpo stage <name>`. Only paths cross task boundaries, never tensors or models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from . import tracking
from .config import load_params
from .runtime import project_lock
from .stages import PATHS, STAGES, StageError

RETRIED_STAGES = {"sample": 1, "train": 1}


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    # `dvc repro` runs `bvpo stage ...` through a shell: make sure it finds this environment's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stream(cmd: list[str], cwd: Path, logger) -> None:
    """Run a stage command, passing its output through as it comes (progress bars included)."""
    logger.info("$ %s", " ".join(cmd))
    process = subprocess.Popen(cmd, cwd=cwd, env=_subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    assert process.stdout is not None
    tail = b""
    binary = getattr(sys.stdout, "buffer", None)
    while chunk := process.stdout.read1(65536):
        if binary is not None:
            binary.write(chunk)
        else:
            sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
        tail = (tail + chunk)[-4000:]
    if process.wait() != 0:
        lines = tail.decode(errors="replace").replace("\r", "\n").splitlines()[-15:]
        raise StageError(f"`{' '.join(cmd)}` failed (exit {process.returncode}):\n" + "\n".join(lines))


def _stage_task(stage: str):
    @task(name=stage, retries=RETRIED_STAGES.get(stage, 0), retry_delay_seconds=5)
    def run(project_dir: str, use_dvc: bool, params_file: str) -> str:
        logger = get_run_logger()
        root = Path(project_dir)
        if use_dvc:
            cmd = [sys.executable, "-m", "dvc", "repro", "--quiet", "--single-item", stage]
        else:
            cmd = [sys.executable, "-m", "bvpo.cli", "stage", stage, "--params", params_file]
        _stream(cmd, root, logger)
        return stage

    return run


STAGE_TASKS = {name: _stage_task(name) for name in STAGES}


@task(name="register")
def register_models(project_dir: str, params_file: str, pipeline_run_id: str) -> dict[str, str]:
    """Log every trained model (transformers flavour) and register it as a version of one
    registered model; the configured method's version gets the `champion` alias."""
    params = load_params(params_file)
    root = Path(project_dir)
    versions = {}
    with tracking.stage_run(root, params.tracking.experiment, "register"):
        for name in params.train.methods:
            alias = "champion" if name == params.tracking.register_method else None
            versions[name] = tracking.log_and_register_model(
                root / PATHS["models"] / name, params.tracking.registered_model, alias,
                {"method": name, "pipeline_run_id": pipeline_run_id},
            )
    return versions


def results_markdown(results: dict, diagnostics: dict | None, versions: dict[str, str], registered: str) -> str:
    lines = ["# BVPO pipeline results", "",
             "| model | accuracy (thinking) | accuracy (no thinking) | mean length (thinking) | registered |",
             "|---|---|---|---|---|"]
    for name, entry in results.items():
        version = f"{registered} v{versions[name]}" if name in versions else ""
        lines.append(f"| {name} | {entry['accuracy_think']:.3f} | {entry['accuracy_nothink']:.3f} | "
                     f"{entry.get('mean_length_think', float('nan')):.1f} | {version} |")
    if diagnostics and diagnostics.get("ratios"):
        lines += ["", "## Thinking ÷ no-thinking (sampled completions)", "", "| statistic | ratio |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in diagnostics["ratios"].items()]
    return "\n".join(lines) + "\n"


@flow(name="bvpo-pipeline", log_prints=True)
def bvpo_pipeline(project_dir: str = ".", params_file: str = "params.yaml", use_dvc: bool | None = None) -> dict:
    """prepare → warmup → sample → pairs → train → evaluate → analyze → register."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root = Path(project_dir).resolve()
    params_path = (root / params_file).resolve()
    params = load_params(params_path)
    if use_dvc is None:
        use_dvc = (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()
    if use_dvc and params_path != (root / "params.yaml").resolve():
        raise StageError(f"DVC stages read {root / 'params.yaml'}; run without DVC to use {params_path}")
    os.environ[tracking.FLOW_RUN_ENV] = str(flow_run.get_id() or "")
    with project_lock(root, f"pipeline flow run {flow_run.get_name() or 'local'}"), \
            tracking.pipeline_run(root, params.tracking.experiment, params.to_dict(),
                                  run_name=f"pipeline-{flow_run.get_name() or 'local'}") as parent_id:
        logger.info("MLflow parent run %s (store %s)", parent_id, tracking.tracking_uri(root))
        for stage in STAGES:
            STAGE_TASKS[stage](str(root), use_dvc, str(params_path))
        versions = register_models(str(root), str(params_path), parent_id)
        results = json.loads((root / PATHS["eval"]).read_text())
        diagnostics = json.loads((root / PATHS["diagnostics"]).read_text())
        tracking.log_metrics({f"{name}/{k}": v for name, entry in results.items() for k, v in entry.items()})
        tracking.log_metrics({f"diagnostics/{group}/{k}": v for group, stats in diagnostics.items()
                              for k, v in stats.items()})
        plots = root / PATHS["train_plots"]
        for artifact in (root / PATHS["eval"], root / PATHS["eval_plot"], root / PATHS["diagnostics"],
                         plots / "curves.png", plots / "gradients.png"):
            tracking.log_artifact(artifact)
        markdown = results_markdown(results, diagnostics, versions, params.tracking.registered_model)
        tracking.log_text(markdown, "results.md")
        create_markdown_artifact(markdown=markdown, key="bvpo-results", description="BVPO pipeline results")
        logger.info("\n%s", markdown)
    return {"eval": results, "diagnostics_ratios": diagnostics.get("ratios", {}), "versions": versions,
            "mlflow_parent_run_id": parent_id,
            "mlflow_experiment_id": tracking.find_experiment_id(root, params.tracking.experiment)}


@task(name="experiment-seed")
def run_experiment_seed(project_dir: str, params_file: str, seed: int) -> dict:
    """One seed: the pipeline as a DVC experiment up to evaluate; returns its eval.json."""
    from . import experiment

    root = Path(project_dir)
    params = load_params(params_file)
    name = experiment.run_name(params, seed)
    experiment.remove_run(root, name)
    command = experiment.seed_command(params, seed)
    _stream([sys.executable, "-m", *command], root, get_run_logger())
    return experiment.run_results(root, name)


@flow(name="bvpo-experiment", log_prints=True)
def bvpo_experiment(project_dir: str = ".", params_file: str = "params.yaml") -> dict:
    """Every method in `experiment.methods` × every seed in `experiment.seeds` on the shared
    base model, aggregated: metrics/experiment.json, .png and .md, one MLflow parent run with a
    child run per model × seed, and the table as a Prefect artifact."""
    from prefect.runtime import flow_run

    from . import experiment
    from .plots import experiment_chart
    from .stages import atomic_path

    root = Path(project_dir).resolve()
    params_path = (root / params_file).resolve()
    if params_path != (root / "params.yaml").resolve():
        raise StageError(f"DVC experiments read {root / 'params.yaml'}; edit it rather than {params_path}")
    params = load_params(params_path)
    x = params.experiment
    experiment.check_repository(root)
    os.environ[tracking.FLOW_RUN_ENV] = str(flow_run.get_id() or "")
    with project_lock(root, f"experiment {x.name}"), \
            tracking.pipeline_run(root, params.tracking.experiment, {"experiment": params.to_dict()["experiment"]},
                                  run_name=f"experiment-{x.name}", kind="experiment") as parent_id:
        per_seed = {seed: run_experiment_seed(str(root), str(params_path), seed) for seed in x.seeds}
        result = experiment.aggregate(per_seed, x.reference_method)
        result["commands"] = {str(seed): " ".join(experiment.seed_command(params, seed)) for seed in x.seeds}
        markdown = experiment.markdown_table(result, x.name)
        outputs = {"json": root / PATHS["experiment"], "plot": root / PATHS["experiment_plot"],
                   "table": root / PATHS["experiment_table"]}
        with atomic_path(outputs["json"]) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
        with atomic_path(outputs["plot"]) as tmp:
            experiment_chart(result, tmp)
        with atomic_path(outputs["table"]) as tmp:
            tmp.write_text(markdown)
        for seed, models in per_seed.items():
            for model, entry in models.items():
                with tracking.stage_run(root, params.tracking.experiment, f"{model}/seed{seed}",
                                        tags={"method": model, "seed": str(seed), "experiment": x.name}):
                    tracking.log_metrics({k: v for k, v in entry.items() if isinstance(v, (int, float))})
        tracking.log_metrics({f"{model}/{metric}_mean": stats["mean"] for model, by_metric in result["models"].items()
                              for metric, stats in by_metric.items()})
        for path in outputs.values():
            tracking.log_artifact(path)
        create_markdown_artifact(markdown=markdown, key="bvpo-experiment", description=f"Experiment {x.name}")
        logger = get_run_logger()
        logger.info("\n%s", markdown)
    return {"result": result, "markdown": markdown, "mlflow_parent_run_id": parent_id}
