"""The Prefect flow: the stages as tasks, one MLflow parent run, registration at the end.

Stage logic lives in `bvpo.stages`; a task only asks DVC to bring its stage up to date
(`dvc repro --single-item <stage>`), so DVC decides what is stale, records dvc.lock, and a
later `dvc repro` has nothing to do. Outside a DVC repository the task runs the same stage
through `bvpo stage <name>`. Only paths cross task boundaries, never tensors or models.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from . import rounds, tracking
from .config import load_params
from .runtime import configure_environment, project_lock, stop_process_tree
from .paths import PATHS, atomic_path, write_champion_pointer
from .stages import STAGES, StageError

RETRIED_STAGES = {"sample": 1, "train": 1}


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    # `dvc repro` runs `bvpo stage ...` through a shell: make sure it finds this environment's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stream(cmd: list[str], cwd: Path, logger) -> None:
    """Run a stage command, passing its output through as it comes (progress bars included).
    Whatever ends the flow while the stage runs (a cancellation, Ctrl-C, an error) ends the
    stage's whole process tree too (dvc, bvpo stage, accelerate launch and its workers), so no
    training outlives the run that owns the project lock."""
    logger.info("$ %s", " ".join(cmd))
    process = subprocess.Popen(cmd, cwd=cwd, env=_subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    assert process.stdout is not None
    tail = b""
    binary = getattr(sys.stdout, "buffer", None)
    try:
        while chunk := process.stdout.read1(65536):
            if binary is not None:
                binary.write(chunk)
            else:
                sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
            tail = (tail + chunk)[-4000:]
        process.wait()
    except BaseException:
        stop_process_tree(process.pid)
        raise
    if process.returncode != 0:
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


@task(name="preflight")
def preflight(project_dir: str, params_file: str) -> None:
    """`bvpo check` before the first stage: the template, prompt lengths against the limits, the
    sampling batch against the device's memory. In a subprocess, so the flow itself never holds
    GPU memory the sampling stage needs."""
    _stream([sys.executable, "-m", "bvpo.cli", "check", "--params", params_file], Path(project_dir),
            get_run_logger())


def lineage_champion(root: Path, registered_model: str, identity: str, versions: list[dict]) -> str | None:
    """`@champion` if it was trained from this base model and task (`base_identity`), else None:
    a champion of another lineage is neither started from nor compared against."""
    version = tracking.champion_version(root, registered_model)
    tags = next((t for t in versions if t["version"] == version), {})
    return version if version is not None and tags.get("base_identity") == identity else None


@task(name="champion")
def resolve_champion(project_dir: str, params_file: str) -> dict:
    """Read `@champion` from the registry into data/champion.json, the round's input. A champion
    trained from another base model or task than params.yaml's now names (`base_identity`
    tags: the model was replaced, or the prompts) is not this lineage's: the round starts from
    the new base model, and `lineage_reset` says why."""
    params = load_params(params_file)
    root = Path(project_dir)
    name = params.tracking.registered_model
    versions = tracking.model_versions(root, name)
    alias, reset = tracking.champion_version(root, name), None
    version = lineage_champion(root, name, rounds.base_identity(params), versions)
    if alias is not None and version is None:
        reset = (f"@champion (version {alias}) was trained from another base model or task than params.yaml "
                 "names now: this round starts from the base model")
    write_champion_pointer(root, name, version)
    return {"registered_model": name, "version": version, "round": rounds.next_round(versions),
            "lineage_reset": reset}


def round_inputs(root: Path, champion: dict) -> dict:
    """What it takes to rebuild a round with `dvc repro`: the champion it started from, the inbox
    files (with their hashes), the commit and the dvc.lock it produced."""
    import hashlib

    from .data import inbox_files

    files = inbox_files(root / PATHS["inbox"])
    return {"round": champion["round"], "champion": {k: champion[k] for k in ("registered_model", "version")},
            "inbox": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
            **tracking.provenance_tags(root)}


@task(name="register")
def register_and_promote(project_dir: str, params_file: str, pipeline_run_id: str, champion: dict) -> dict:
    """Register every trained method as a version carrying its lineage, then promote the
    candidate (`tracking.register_method`) to `@champion` only if it beats the round's starting
    model by `promotion.margin` on the held-out selection prompts (`evaluate.selection_fraction`;
    eval.json reports the other ones). Models already registered (the same
    weights: the round's inputs did not change) are not registered again.

    Crash-safe by ordering: the decision is made before anything is written; each version is
    created with all its tags at once (the candidate's with its decision, and first); the alias
    moves last. A rerun after a kill at any point registers what is missing and applies a
    promotion that was decided but not applied (`rounds.pending_promotion`)."""
    params = load_params(params_file)
    root = Path(project_dir)
    name, candidate = params.tracking.registered_model, params.tracking.register_method
    fingerprints = {m: rounds.model_fingerprint(root / PATHS["models"] / m) for m in params.train.methods}
    registered = {tags["fingerprint"]: tags for tags in tracking.model_versions(root, name) if "fingerprint" in tags}
    decision = None
    if fingerprints[candidate] not in registered:
        scores = json.loads((root / PATHS["eval_prompts"]).read_text())["scores"]
        p = params.promotion
        decision = rounds.decide(scores, candidate, p.metric, p.margin, p.require_interval)
    lineage = {"round": str(champion["round"]), "started_from_version": champion["version"] or "base",
               "base_identity": rounds.base_identity(params), "pipeline_run_id": pipeline_run_id,
               **tracking.provenance_tags(root)}
    versions = {m: registered[f]["version"] for m, f in fingerprints.items() if f in registered}
    candidate_tags = registered.get(fingerprints[candidate])
    new_versions = []
    missing = sorted((m for m in fingerprints if m not in versions), key=lambda m: m != candidate)
    if missing:
        with tracking.stage_run(root, params.tracking.experiment, "register", tags={"round": lineage["round"]}):
            for method in missing:
                tags = {"method": method, "fingerprint": fingerprints[method], **lineage}
                if method == candidate:
                    tags.update(rounds.decision_tags(decision))
                    candidate_tags = tags
                versions[method] = tracking.log_and_register_model(root / PATHS["models"] / method, name, tags)
                new_versions.append(versions[method])
    current = lineage_champion(root, name, lineage["base_identity"], tracking.model_versions(root, name))
    promoted = rounds.pending_promotion(candidate_tags, current, versions[candidate], lineage["base_identity"])
    if promoted:
        tracking.set_champion(root, name, versions[candidate])
    return {"round": champion["round"] if decision or new_versions else None, "versions": versions, "decision": decision,
            "new_versions": new_versions, "finished_promotion": versions[candidate] if promoted and not decision
            else None}


ROUND_SLOT_PREFIX = "bvpo-round-"


@contextlib.contextmanager
def round_slot(registered_model: str, logger):
    """One round of a registered model at a time across every clone and worker that shares a
    Prefect server: a global concurrency limit of 1 named after the model (created on first use).
    A second round waits for the slot; a crashed holder's lease lapses within `lease_duration`.
    Without a server (the embedded default) the project's flock is the only guard."""
    if not os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = ROUND_SLOT_PREFIX + registered_model
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass
    logger.info("Taking the round slot %r (one round of %s at a time on this Prefect server)", name, registered_model)
    # A missed lease renewal (a busy server) must not cancel hours of training: the slot is a guard.
    waited = time.monotonic()
    with concurrency(name, occupy=1, strict=True, lease_duration=300, raise_on_lease_renewal_failure=False):
        logger.info("Holding the round slot %r (waited %.0f s)", name, time.monotonic() - waited)
        yield


def dvc_remote_name(root: Path, remote: str | None) -> str | None:
    """Where a round's outputs go: `stack.dvc_remote` (a configured remote as is; a path or URL
    becomes the project's default remote `bvpo` in .dvc/config, committed with the project, so
    every clone pushes to and pulls from the same place), else the project's default remote if
    it has one, else None (nothing is pushed)."""
    if remote is None:
        found = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=root, capture_output=True,
                               text=True, env=_subprocess_env())
        return found.stdout.strip() or None if found.returncode == 0 else None
    # `dvc config --list` (remote.NAME.url=URL), not `dvc remote list`, whose columns wrap.
    listed = subprocess.run([sys.executable, "-m", "dvc", "config", "--list"], cwd=root, capture_output=True,
                            text=True, env=_subprocess_env())
    names = {key.split(".")[1]: url for key, _, url in (line.partition("=") for line in listed.stdout.splitlines())
             if key.startswith("remote.") and key.endswith(".url")}
    if remote in names:
        return remote
    if names.get("bvpo") != remote:
        subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "--default", "--force", "bvpo", remote],
                       cwd=root, check=True, capture_output=True, env=_subprocess_env())
    return "bvpo"


@task(name="push", retries=2, retry_delay_seconds=10)
def push_outputs(project_dir: str, remote: str | None) -> str | None:
    """`dvc push` of every stage output to the team's remote (`dvc_remote_name`), so another
    clone can `dvc pull` this round's data (and `dvc repro` finds nothing to rebuild)."""
    root = Path(project_dir)
    name = dvc_remote_name(root, remote)
    if name is None:
        return None
    _stream([sys.executable, "-m", "dvc", "push", "--quiet", "-r", name], root, get_run_logger())
    return name


def champion_history_rows(project_dir: Path, registered_model: str) -> list[dict]:
    """One row per round that decided a promotion, from the candidates' version tags."""
    rows = []
    for tags in tracking.model_versions(project_dir, registered_model):
        if "promotion_decision" not in tags or "round" not in tags:  # not a candidate (or registered by old code)
            continue
        rows.append({"round": int(tags["round"]), "version": tags["version"],
                     "promoted": tags["promotion_decision"] == "promoted",
                     **{k: float(tags[f"promotion_{k}"]) for k in
                        ("candidate_score", "champion_score", "interval_low", "interval_high")}})
    return rows


def results_markdown(results: dict, diagnostics: dict | None, versions: dict[str, str], registered: str,
                     round_result: dict | None = None) -> str:
    lines = ["# BVPO pipeline results", ""]
    if round_result is not None:
        started = round_result["started_from_version"]
        if round_result["decision"] is None:
            lines += ["No promotion decision this run: the candidate came out with the weights and config of a "
                      "version already registered (its inputs did not change, or changed nothing it learned), so it "
                      "was not registered again and `@champion` did not move.", ""]
        else:
            lines += [f"Round {round_result['round']}, started from "
                      + (f"{registered} v{started} (`@champion`)" if started else "the base model")
                      + ". " + rounds.decision_summary(round_result["decision"]) + ".", ""]
    key = "accuracy" if all("accuracy_think" in entry for entry in results.values()) else "reward"
    lines += [f"| model | {key} (thinking) | {key} (no thinking) | mean length (thinking) | registered |",
              "|---|---|---|---|---|"]
    for name, entry in results.items():
        version = f"{registered} v{versions[name]}" if versions.get(name) else ""
        lines.append(f"| {name} | {entry[f'{key}_think']:.3f} | {entry[f'{key}_nothink']:.3f} | "
                     f"{entry.get('mean_length_think', float('nan')):.1f} | {version} |")
    n_report = next(iter(results.values()), {}).get("n_prompts")
    if n_report:
        lines += ["", f"Held-out scores over the {n_report} report prompts, which never decide a promotion "
                  "(`evaluate.selection_fraction`: the selection prompts do)."]
    if diagnostics and diagnostics.get("ratios"):
        lines += ["", "## Thinking ÷ no-thinking (sampled completions)", "", "| statistic | ratio |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in diagnostics["ratios"].items()]
    return "\n".join(lines) + "\n"


@flow(name="bvpo-pipeline", log_prints=True)
def bvpo_pipeline(project_dir: str = ".", params_file: str = "params.yaml", use_dvc: bool | None = None) -> dict:
    """One round: champion → prepare → warmup → reward_model → policy → sample → pairs → train → evaluate →
    analyze → register and promote. Round 1 starts from the base model; each later round from
    the registered `@champion`."""
    from prefect.runtime import flow_run

    from .plots import champion_history

    logger = get_run_logger()
    from .stack import export_environment

    root = Path(project_dir).resolve()
    params_path = (root / params_file).resolve()
    # A worker starts this flow by module path, not through the CLI: settle the environment here.
    configure_environment(root, params_file)
    export_environment(root, params_path)
    params = load_params(params_path)
    if use_dvc is None:
        use_dvc = (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()
    if params.evaluate.selection_fraction == 0:
        raise StageError("evaluate.selection_fraction is 0: no held-out prompt could decide a promotion, so a round "
                         "cannot end; set it above 0 (0.5 is the default; only `bvpo experiment` uses 0)")
    if use_dvc and params_path != (root / "params.yaml").resolve():
        raise StageError(f"DVC stages read {root / 'params.yaml'}; run without DVC to use {params_path}")
    os.environ[tracking.FLOW_RUN_ENV] = str(flow_run.get_id() or "")
    registered = params.tracking.registered_model
    with project_lock(root, f"pipeline flow run {flow_run.get_name() or 'local'}"), round_slot(registered, logger):
        preflight(str(root), str(params_path))
        champion = resolve_champion(str(root), str(params_path))
        started = champion["version"]
        if champion["lineage_reset"]:
            logger.warning(champion["lineage_reset"])
        logger.info("Round %d starts from %s", champion["round"],
                    f"{registered} v{started} (@champion)" if started else "the base model")
        with tracking.pipeline_run(root, params.tracking.experiment, params.to_dict(),
                                   run_name=f"round-{champion['round']}-{flow_run.get_name() or 'local'}",
                                   tags={"round": str(champion["round"]), "started_from_version": started or "base",
                                         **({"lineage_reset": champion["lineage_reset"]}
                                            if champion["lineage_reset"] else {})}) as parent_id:
            logger.info("MLflow parent run %s (store %s)", parent_id, tracking.active_uri(root))
            for stage in STAGES:
                STAGE_TASKS[stage](str(root), use_dvc, str(params_path))
            registration = register_and_promote(str(root), str(params_path), parent_id, champion)
            decision = registration["decision"]
            if use_dvc:
                # The round is registered by now: a remote that is down is reported, not fatal
                # (`dvc push` later sends the same outputs).
                try:
                    remote = push_outputs(str(root), params.stack.dvc_remote)
                    if remote is not None:
                        tracking.set_tags({"dvc_remote": remote})
                except Exception as err:  # noqa: BLE001 - any failure of the push is reported the same way
                    logger.warning("dvc push failed, the round's outputs are only local: %s", err)
                    tracking.set_tags({"dvc_push_failed": str(err)[:500]})
            results = json.loads((root / PATHS["eval"]).read_text())
            diagnostics = json.loads((root / PATHS["diagnostics"]).read_text())
            tracking.log_metrics({f"{name}/{k}": v for name, entry in results.items() for k, v in entry.items()})
            tracking.log_metrics({f"diagnostics/{group}/{k}": v for group, stats in diagnostics.items()
                                  for k, v in stats.items()})
            tracking.log_dict(round_inputs(root, champion), "round_inputs.json")
            if registration["finished_promotion"]:
                tracking.set_tags({"round_outcome": "finished an interrupted promotion",
                                   "champion_after": registration["finished_promotion"]})
                logger.info("An earlier run decided to promote version %s and was stopped before @champion moved: "
                            "moved it now", registration["finished_promotion"])
            elif decision is None:
                tracking.set_tags({"round_outcome": "no new inputs"})
                logger.info("The candidate equals a registered version (same weights and config): no promotion "
                            "decision, @champion unchanged (%d new versions)", len(registration["new_versions"]))
            else:
                tracking.set_tags({"round_outcome": "promoted" if decision["promoted"] else "not promoted",
                                   "champion_after": tracking.champion_version(root, registered) or "base"})
                tracking.log_metrics({f"promotion/{k}": v for k, v in decision.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
                tracking.log_metrics({"promotion/promoted": float(decision["promoted"])})
                logger.info(rounds.decision_summary(decision))
            history = champion_history_rows(root, registered)
            if history:
                with tempfile.TemporaryDirectory() as tmp:
                    champion_history(history, params.promotion.metric, Path(tmp) / "champion_history.png")
                    tracking.log_artifact(Path(tmp) / "champion_history.png")
            plots = root / PATHS["train_plots"]
            for artifact in (root / PATHS["eval"], root / PATHS["eval_plot"], root / PATHS["diagnostics"],
                             plots / "curves.png", plots / "gradients.png", root / "dvc.lock",
                             root / PATHS["champion"]):
                if artifact.is_file():
                    tracking.log_artifact(artifact)
            round_result = {"round": champion["round"], "started_from_version": started, "decision": decision}
            markdown = results_markdown(results, diagnostics, registration["versions"], registered, round_result)
            tracking.log_text(markdown, "results.md")
            create_markdown_artifact(markdown=markdown, key="bvpo-results", description="BVPO round results")
            logger.info("\n%s", markdown)
    return {"eval": results, "diagnostics_ratios": diagnostics.get("ratios", {}),
            "versions": registration["versions"], "new_versions": registration["new_versions"],
            "round": registration["round"], "started_from_version": started,
            "decision": decision, "finished_promotion": registration["finished_promotion"],
            "champion": tracking.champion_version(root, registered),
            "mlflow_parent_run_id": parent_id,
            "mlflow_experiment_id": tracking.find_experiment_id(root, params.tracking.experiment)}


@contextlib.contextmanager
def starting_from_base(root: Path, registered_model: str):
    """Experiments compare methods from the base model, whatever `@champion` is: while they run,
    data/champion.json (an input that `dvc exp run --temp` copies into each experiment) names no
    version; the round's pointer is restored after."""
    path = root / PATHS["champion"]
    original = path.read_text() if path.is_file() else None
    write_champion_pointer(root, registered_model, None)
    try:
        yield
    finally:
        if original is None:
            path.unlink(missing_ok=True)
        elif path.read_text() != original:
            with atomic_path(path) as tmp:
                tmp.write_text(original)


@task(name="experiment-seed")
def run_experiment_seed(project_dir: str, params_file: str, seed: int, task: str = "arithmetic") -> dict:
    """One seed: the pipeline as a DVC experiment up to evaluate; returns its eval.json."""
    from . import experiment

    root = Path(project_dir)
    params = load_params(params_file)
    name = experiment.run_name(params, seed, task)
    experiment.remove_run(root, name)
    command = experiment.seed_command(params, seed, task)
    _stream([sys.executable, "-m", *command], root, get_run_logger())
    return experiment.run_results(root, name)


@task(name="experiment-round")
def run_experiment_round(project_dir: str, run: str, method: str, seed: int, round_number: int,
                         start_model: str, work_dir: str) -> dict:
    """One later round of one method and seed: sample from `start_model` (a relative path: the
    model in the seed's DVC experiment `run`; an absolute one: the previous round's folder),
    pair, train from it (policy and reference) and evaluate, with the ordinary stage commands in
    `work_dir`. Always continues, whatever the model scored (no registry, no gate), as the
    iterative recipe does. A folder evaluated earlier from the same start model under the same
    params is reused, so a longer run extends a shorter one."""
    from dvc.api import DVCFileSystem

    from . import experiment
    from .rounds import model_fingerprint

    logger = get_run_logger()
    root, work = Path(project_dir), Path(work_dir)
    ref = experiment.run_ref(root, run)
    fs = DVCFileSystem(str(root), rev=ref)
    params_text = experiment.round_params(fs.read_text("params.yaml"), method, seed, round_number)
    local = Path(start_model).is_absolute()
    start = {"model": model_fingerprint(start_model) if local else f"{experiment.commit_of(root, ref)}:{start_model}",
             "params": params_text}
    done, start_file = work / PATHS["eval"], work / "round_start.json"
    if done.is_file() and start_file.is_file() and json.loads(start_file.read_text()) == start:
        logger.info("round %d, seed %d, %s: evaluated earlier from the same model and params, reused",
                    round_number, seed, method)
        return json.loads(done.read_text())[method]
    if work.exists():
        shutil.rmtree(work)
    (work / "data").mkdir(parents=True)
    for path in experiment.ROUND_INPUTS:
        if fs.exists(path):
            fs.get(path, str(work / path), recursive=True)
    if local:
        shutil.copytree(start_model, work / PATHS["policy"])
    else:
        fs.get(start_model, str(work / PATHS["policy"]), recursive=True)
    (work / "params.yaml").write_text(params_text)
    for stage in experiment.ROUND_STAGES:
        _stream([sys.executable, "-m", "bvpo.cli", "--project-dir", str(work), "stage", stage,
                 "--params", str(work / "params.yaml")], work, logger)
    start_file.write_text(json.dumps(start) + "\n")  # last: a round cut short is never reused
    return json.loads(done.read_text())[method]


def run_experiment_rounds(root: Path, params, task: str, rounds: int, per_seed: dict) -> dict:
    """Rounds 2..`rounds` of `experiment.round_methods`, per seed, each from its own newest model;
    round 1 is the experiment itself. The table over `<method>@r<R>`: means and 95% intervals
    over seeds, paired differences against the first method's last round."""
    from . import experiment

    x = params.experiment
    name = experiment.experiment_name(params, task)
    table: dict[int, dict[str, dict]] = {}
    for seed in x.seeds:
        run = experiment.run_name(params, seed, task)
        table[seed] = {}
        for method in x.round_methods:
            table[seed][experiment.round_label(method, 1)] = per_seed[seed][method]
            start = f"{PATHS['models']}/{method}"
            for round_number in range(2, rounds + 1):
                work = (root / PATHS["experiment_rounds"] / name / f"round{round_number}" / f"seed{seed}-{method}").resolve()
                table[seed][experiment.round_label(method, round_number)] = run_experiment_round(
                    str(root), run, method, seed, round_number, start, str(work))
                start = str(work / PATHS["models"] / method)
    order = [experiment.round_label(m, r) for m in x.round_methods for r in range(1, rounds + 1)]
    table = {seed: {label: models[label] for label in order} for seed, models in table.items()}
    return experiment.aggregate(table, experiment.round_label(x.round_methods[0], rounds),
                                experiment.round_metrics(task))


@flow(name="bvpo-experiment", log_prints=True)
def bvpo_experiment(project_dir: str = ".", params_file: str = "params.yaml", task: str | None = None,
                    rounds: int = 1) -> dict:
    """Every method in `experiment.methods` × every seed in `experiment.seeds` on the shared
    base model, aggregated: metrics/experiment.json, .png and .md, one MLflow parent run with a
    child run per model × seed, and the table as a Prefect artifact. `task` (default
    `data.task`) judged runs the judged task (its reward model ranks the pairs) into
    metrics/experiment-judged.*. `rounds` > 1 then carries `experiment.round_methods` on for
    more on-policy rounds (metrics/experiment[-judged]-rounds.json and .md)."""
    from prefect.runtime import flow_run

    from . import experiment
    from .plots import experiment_chart

    root = Path(project_dir).resolve()
    params_path = (root / params_file).resolve()
    if params_path != (root / "params.yaml").resolve():
        raise StageError(f"DVC experiments read {root / 'params.yaml'}; edit it rather than {params_path}")
    params = load_params(params_path)
    x = params.experiment
    task = task or params.data.task
    experiment.check_task(task)
    experiment.check_rounds(params, rounds)
    experiment.check_repository(root)
    name = experiment.experiment_name(params, task)
    logger = get_run_logger()
    os.environ[tracking.FLOW_RUN_ENV] = str(flow_run.get_id() or "")
    with project_lock(root, f"experiment {name}"), \
            tracking.pipeline_run(root, params.tracking.experiment,
                                  {"experiment": params.to_dict()["experiment"], "task": task, "rounds": rounds},
                                  run_name=f"experiment-{name}", kind="experiment") as parent_id:
        with starting_from_base(root, params.tracking.registered_model):
            per_seed = {seed: run_experiment_seed(str(root), str(params_path), seed, task) for seed in x.seeds}
        result = experiment.aggregate(per_seed, x.reference_method, experiment.metrics_for(task))
        result["task"] = task
        result["commands"] = {str(seed): " ".join(experiment.seed_command(params, seed, task)) for seed in x.seeds}
        markdown = experiment.markdown_table(result, name)
        outputs = {kind: root / path for kind, path in experiment.output_paths(task).items()}
        with atomic_path(outputs["json"]) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
        with atomic_path(outputs["plot"]) as tmp:
            experiment_chart(result, tmp)
        with atomic_path(outputs["table"]) as tmp:
            tmp.write_text(markdown)
        log_experiment_runs(root, params, name, task, per_seed)
        tracking.log_metrics({f"{model}/{metric}_mean": stats["mean"] for model, by_metric in result["models"].items()
                              for metric, stats in by_metric.items()})
        for kind in ("json", "plot", "table"):
            tracking.log_artifact(outputs[kind])
        artifact_key = "bvpo-experiment" + ("" if task == "arithmetic" else f"-{task}")
        create_markdown_artifact(markdown=markdown, key=artifact_key, description=f"Experiment {name}")
        logger.info("\n%s", markdown)
        rounds_result = rounds_markdown = None
        if rounds > 1:
            rounds_result = run_experiment_rounds(root, params, task, rounds, per_seed)
            rounds_markdown = experiment.markdown_table(rounds_result, f"{name}, {rounds} rounds")
            with atomic_path(outputs["rounds_json"]) as tmp:
                tmp.write_text(json.dumps(rounds_result, indent=2) + "\n")
            with atomic_path(outputs["rounds_table"]) as tmp:
                tmp.write_text(rounds_markdown)
            later = {seed: {label: entry for label, entry in models.items() if not label.endswith("@r1")}
                     for seed, models in rounds_result["runs"].items()}
            log_experiment_runs(root, params, name, task, later)
            for kind in ("rounds_json", "rounds_table"):
                tracking.log_artifact(outputs[kind])
            create_markdown_artifact(markdown=rounds_markdown, key=f"{artifact_key}-rounds",
                                     description=f"Experiment {name}, {rounds} rounds")
            logger.info("\n%s", rounds_markdown)
    return {"result": result, "markdown": markdown, "rounds": rounds_result, "rounds_markdown": rounds_markdown,
            "mlflow_parent_run_id": parent_id}


def log_experiment_runs(root: Path, params, name: str, task: str, per_seed: dict) -> None:
    """One MLflow child run per model (or `method@rR`) and seed, with its numbers."""
    for seed, models in per_seed.items():
        for model, entry in models.items():
            with tracking.stage_run(root, params.tracking.experiment, f"{model}/seed{seed}",
                                    tags={"method": model.split("@")[0], "seed": str(seed), "experiment": name,
                                          "task": task}):
                tracking.log_metrics({k: v for k, v in entry.items() if isinstance(v, (int, float))})
