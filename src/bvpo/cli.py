"""`bvpo`: run the pipeline, run one stage, browse results, schedule.

    bvpo init --model M      write a params.yaml for a real model from a recipe
    bvpo check               the preflight: template, prompt lengths, sampling memory
    bvpo run                 the Prefect pipeline flow on params.yaml (DVC decides what is stale)
    bvpo stage NAME          one stage (what dvc.yaml calls)
    bvpo experiment          every method x several seeds (DVC experiments), with 95% intervals
    bvpo champion show|history|set   the registered @champion: show it, its history, roll it back
    bvpo ui                  the MLflow UI over the project's store, on 127.0.0.1
    bvpo schedule --cron C   serve the round flow on a schedule (needs a Prefect server)
    bvpo serve               start a loopback Prefect server and serve the schedule, one command
    bvpo stack up|down|status  team mode: PostgreSQL, MLflow and Prefect servers and a worker
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .errors import BvpoError
from .runtime import configure_environment

EXIT_USAGE = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bvpo", description="BVPO preference optimisation for reasoning "
                                     "models, as a reproducible pipeline (Prefect + DVC + MLflow).")
    parser.add_argument("--project-dir", default=".", help="project root (params.yaml, dvc.yaml, mlruns/)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .stages import STAGES

    run = sub.add_parser("run", help="run the whole pipeline as a Prefect flow",
                         description="Run one round as a Prefect flow: read @champion from the registry, then "
                         f"{' → '.join(STAGES)} (warmup and reward_model only where the task needs them), then "
                         "register every method and promote the candidate if it beats the champion. Inside "
                         "a DVC repository each stage runs through `dvc repro`, so up-to-date stages are "
                         "skipped and dvc.lock is kept current.")
    run.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    run.add_argument("--no-dvc", action="store_true", help="run every stage directly, without DVC")

    init = sub.add_parser("init", help="write a params.yaml for a real model from a recipe",
                          description="Write params.yaml for a real reasoning model from a recipe: every value that "
                          "is not the embedded default's with a comment saying where it comes from (the paper, a "
                          "peer's recipe, the model card, or a stated budget choice). Then `bvpo check`, `bvpo run`.")
    init.add_argument("--model", required=True, help="local model directory or hub id (e.g. Qwen/Qwen3-0.6B)")
    from .recipes import RECIPES

    init.add_argument("--recipe", required=True, choices=sorted(RECIPES),
                      help="; ".join(f"{name}: {r.description}" for name, r in RECIPES.items()))
    init.add_argument("--prompts", help="your prompts file (.jsonl/.parquet; keep it under data/inputs/)")
    init.add_argument("--reward-model", help="a reward model directory, to rank samples of prompts without answers")
    init.add_argument("--out", default="params.yaml", help="where to write (default: params.yaml)")
    init.add_argument("--force", action="store_true", help="replace an existing file")

    check = sub.add_parser("check", help="the preflight: template, prompt lengths, sampling memory",
                           description="Check before any sampling: the model's chat template runs both modes, "
                           "prompts plus sample.max_new_tokens fit model.max_length, the sampling batch's KV cache "
                           "fits this machine's free memory, and the settings that need answers have them.")
    check.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")

    stage = sub.add_parser("stage", help="run one pipeline stage", description="Run one stage on params.yaml; "
                           "this is what dvc.yaml's stages call.")
    stage.add_argument("name", choices=STAGES, help="the stage to run")
    stage.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    stage.add_argument("--fresh", action="store_true", help="train: discard checkpoints of an interrupted run "
                       "instead of resuming from them (resuming is the default)")

    experiment = sub.add_parser(
        "experiment", help="every method x several seeds, aggregated with 95%% intervals",
        description="Train and evaluate every method in params.yaml's `experiment.methods` once per seed in "
        "`experiment.seeds`, each seed a DVC experiment of the pipeline (`dvc exp run --temp`) on the shared "
        "base model, then aggregate: metrics/experiment.json (means, 95%% intervals, paired differences "
        "against `experiment.reference_method`), metrics/experiment.png and .md, MLflow runs. Needs a DVC "
        "project with a git commit.")
    experiment.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    experiment.add_argument("--task", choices=("arithmetic", "judged"), default=None,
                            help="embedded task (default: data.task). judged: pairs ranked by the reward model "
                            "the pipeline trains, scored by the hidden gold grade; writes metrics/experiment-judged.*")
    experiment.add_argument("--rounds", type=_positive_int, default=1, metavar="N",
                            help="rounds in all, the experiment being round 1: experiment.round_methods then sample "
                            "from their own newest model, pair and train again, per seed (no registry, no gate); "
                            "writes metrics/experiment[-TASK]-rounds.{json,md}. Rounds already evaluated under the "
                            "same params are reused (default: 1)")

    champion = sub.add_parser("champion", help="show, list or set the registered @champion",
                              description="The registered model's @champion alias, which every round starts "
                              "from: `show` it, list its `history` (each round's decision, each change by hand), or "
                              "`set` it to another version (or `base`) with a reason, recorded on the versions.")
    actions = champion.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("show", "the current @champion and its tags"),
                         ("history", "each round's promotion decision and each change made by hand"),
                         ("set", "point @champion at VERSION (or 'base'), recording why")):
        command = actions.add_parser(action, help=text, description=text)
        command.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
        if action == "set":
            command.add_argument("version", help="a registered version number, or 'base' to start from the base model")
            command.add_argument("--reason", required=True, help="why (recorded on the versions)")

    ui = sub.add_parser("ui", help="serve the MLflow UI over the project's store",
                        description="Serve the MLflow UI on 127.0.0.1 over mlruns/mlflow.db.")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")

    stack = sub.add_parser("stack", help="team mode: PostgreSQL + MLflow server + Prefect server + worker",
                           description="Start, stop or show the shared stack on this machine (loopback only): "
                           "PostgreSQL, an MLflow tracking server on it serving the artifacts, a Prefect server on "
                           "it and a process worker on the `bvpo` work pool. While it is up, this project's "
                           "commands use it; other clones point at it with params.yaml's `stack` section or "
                           "MLFLOW_TRACKING_URI / PREFECT_API_URL.")
    actions = stack.add_subparsers(dest="action", required=True, metavar="ACTION")
    stack_up = actions.add_parser("up", help="start every part (idempotent)")
    stack_up.add_argument("--data-dir", help="PostgreSQL data and artifacts (default: .stack/ in the project)")
    stack_up.add_argument("--postgres-port", type=int, default=5433)
    stack_up.add_argument("--mlflow-port", type=int, default=5000)
    stack_up.add_argument("--prefect-port", type=int, default=4200)
    stack_up.add_argument("--workers", type=int, default=1, help="process workers to start (default: 1)")
    stack_up.add_argument("--database-url", help="use this PostgreSQL (databases `mlflow` and `prefect`) instead of "
                          "starting one, e.g. postgresql://bvpo@db.internal:5432 (password: PGPASSWORD or PGPASSFILE)")
    stack_up.add_argument("--artifacts", help="where the MLflow server keeps artifacts: a path, s3://bucket/prefix, "
                          "gs://... (default: artifacts/ under --data-dir)")
    actions.add_parser("down", help="stop every part `up` started (the data stays)")
    actions.add_parser("status", help="what runs where, and which servers this project uses")

    for name, help_text, description in (
        ("schedule", "schedule the round flow (a deployment on the work pool, or served here)",
         "Make the pipeline flow (one round per run) a Prefect deployment on a cron or interval schedule; "
         "runs also start on demand (Prefect UI, `prefect deployment run`). With a work pool (`bvpo stack up`, "
         "or `stack.work_pool`) the deployment goes to the pool and its workers run the rounds, and this "
         "command returns; without one, this process serves the schedule until stopped. Needs a running "
         "Prefect server (`bvpo stack up`, `stack.prefect_api_url` or PREFECT_API_URL)."),
        ("serve", "start a loopback Prefect server and serve the schedule",
         "One command for a one-machine install: start `prefect server start` on 127.0.0.1, then serve "
         "the round flow on its schedule against it; Ctrl-C stops both."),
    ):
        command = sub.add_parser(name, help=help_text, description=description)
        when = command.add_mutually_exclusive_group()
        when.add_argument("--cron", help="cron expression (default: daily at 03:00)")
        when.add_argument("--interval", type=float, help="seconds between runs, instead of --cron")
        command.add_argument("--name", default="bvpo-scheduled", help="deployment name")
        if name == "serve":
            command.add_argument("--port", type=int, default=4200, help="Prefect server port (default: 4200)")
    return parser


def _tracking_experiment(root: Path) -> str:
    """The project's MLflow experiment name (params.yaml's tracking.experiment, else the default)."""
    from .config import ConfigError, load_params

    try:
        return load_params(root / "params.yaml").tracking.experiment
    except (ConfigError, OSError):  # no or broken params: the UI still serves the store
        return "bvpo"


def _stop_on_sigterm() -> None:
    """SIGTERM (and SIGHUP) unwind like Ctrl-C: the flow's stage processes and the temporary
    Prefect server are stopped on the way out instead of being orphaned. (Prefect's own handler,
    active while a flow runs, hands the signal back to this one after its bookkeeping.)"""

    def stop(signum, frame):
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


def _run(args) -> int:
    from .flow import bvpo_pipeline
    from .rounds import decision_summary
    from .tracking import ui_url

    _stop_on_sigterm()
    root = Path(args.project_dir).resolve()
    use_dvc = False if args.no_dvc else None
    result = bvpo_pipeline(project_dir=str(root), params_file=args.params, use_dvc=use_dvc)
    print("\nDone. Results: metrics/eval.json, metrics/eval.png, metrics/diagnostics.json, metrics/train/")
    if result["decision"] is not None:
        print(f"Round {result['round']}: {decision_summary(result['decision'])}")
    elif result["finished_promotion"]:
        print(f"Version {result['finished_promotion']} was promoted by an earlier run stopped before @champion moved: "
              "moved it now.")
    else:
        print("The candidate equals a version already registered (same weights and config): no promotion decision.")
    print(f"@champion: {'version ' + result['champion'] if result['champion'] else 'none yet (the base model)'}")
    print(f"MLflow parent run {result['mlflow_parent_run_id']}: browse with `bvpo ui`, then open "
          f"{ui_url('http://127.0.0.1:5000', result['mlflow_experiment_id'], result['mlflow_parent_run_id'])}")
    for name, entry in result["eval"].items():
        key = "accuracy" if "accuracy_think" in entry else "reward"
        print(f"  {name:>12}: {key} thinking {entry[f'{key}_think']:.3f}  no-thinking {entry[f'{key}_nothink']:.3f}")
    return 0


def _stage(args) -> int:
    from .config import load_params
    from .stages import run_stage

    root = Path(args.project_dir).resolve()
    params_file = Path(args.params)
    if not params_file.is_absolute():
        params_file = root / params_file
    params = load_params(params_file)
    if args.fresh:
        import shutil

        from .paths import PATHS

        shutil.rmtree(root / PATHS["checkpoints"], ignore_errors=True)
    out = run_stage(args.name, params, root, params_file)
    print(f"bvpo stage {args.name}: wrote {out.relative_to(root) if out.is_relative_to(root) else out}")
    return 0


def _init(args) -> int:
    from .recipes import write

    root = Path(args.project_dir).resolve()
    out = write(args.recipe, args.model, root / args.out, args.prompts, args.reward_model, args.force)
    print(f"bvpo init: wrote {out} ({args.recipe} for {args.model}). Next: `bvpo check`, then `bvpo run`.")
    return 0


def _check(args) -> int:
    from .config import load_params
    from .preflight import run

    root = Path(args.project_dir).resolve()
    params_file = Path(args.params) if Path(args.params).is_absolute() else root / args.params
    for note in run(load_params(params_file), root, params_file):
        print(f"bvpo check: {note}")
    print("bvpo check: ok")
    return 0


def _champion(args) -> int:
    from .config import load_params
    from .flow import champion_history_rows
    from .tracking import champion_version, model_versions, set_champion_by_hand

    root = Path(args.project_dir).resolve()
    name = load_params(root / args.params).tracking.registered_model
    versions = {tags["version"]: tags for tags in model_versions(root, name)}
    if args.action == "set":
        version = None if args.version == "base" else args.version
        previous = set_champion_by_hand(root, name, version, args.reason)
        print(f"@champion: {'version ' + version if version else 'removed (rounds start from the base model)'} "
              f"(was {'version ' + previous if previous else 'the base model'}); recorded on the versions")
        return 0
    current = champion_version(root, name)
    if args.action == "show":
        if current is None:
            print(f"{name}: no @champion (rounds start from the base model)")
            return 0
        tags = versions.get(current, {})
        print(f"{name} @champion: version {current}")
        for key in sorted(tags):
            if key != "version":
                print(f"  {key}: {tags[key]}")
        return 0
    rows = champion_history_rows(root, name)
    print(f"{name}: @champion is {'version ' + current if current else 'unset (the base model)'}")
    if rows:
        print(f"{'round':>5} {'version':>7}  {'decision':<13} {'candidate':>9} {'champion':>9}  95% interval")
    for row in sorted(rows, key=lambda r: r["round"]):
        print(f"{row['round']:>5} {row['version']:>7}  {'promoted' if row['promoted'] else 'not promoted':<13} "
              f"{row['candidate_score']:>9.4f} {row['champion_score']:>9.4f}  "
              f"[{row['interval_low']:+.4f}, {row['interval_high']:+.4f}]")
    for version, tags in sorted(versions.items(), key=lambda item: item[1].get("champion_set_at", "")):
        if "champion_set_at" in tags:
            print(f"set by hand at {tags['champion_set_at']}: version {version} (was {tags['champion_set_from']}): "
                  f"{tags['champion_set_reason']}")
    return 0


def _experiment(args) -> int:
    from .config import load_params
    from .experiment import output_paths
    from .flow import bvpo_experiment

    _stop_on_sigterm()
    root = Path(args.project_dir).resolve()
    task = args.task or load_params(root / args.params).data.task
    result = bvpo_experiment(project_dir=str(root), params_file=args.params, task=task, rounds=args.rounds)
    print("\n" + result["markdown"])
    if result["rounds_markdown"]:
        print(result["rounds_markdown"])
    written = [path for path in output_paths(task).values() if args.rounds > 1 or "-rounds." not in path]
    print(f"Written: {', '.join(written)}; MLflow parent run "
          f"{result['mlflow_parent_run_id']} (`bvpo ui`); each seed is a DVC experiment (`dvc exp show`).")
    return 0


def _ui(args) -> int:
    from .tracking import artifact_root, find_experiment_id, tracking_uri, ui_url

    root = Path(args.project_dir).resolve()
    served = os.environ.get("MLFLOW_TRACKING_URI", "")
    if served.startswith(("http://", "https://")):
        print(f"This project logs to the MLflow server {served}: open it in a browser (`bvpo ui` serves only "
              "the embedded mlruns/ store).")
        return 0
    (root / "mlruns").mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(root),
           "--default-artifact-root", artifact_root(root).as_uri(), "--host", args.host, "--port", str(args.port)]
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {base} (store {tracking_uri(root)}); Ctrl-C stops it.")
    experiment = _tracking_experiment(root)
    experiment_id = find_experiment_id(root, experiment)
    if experiment_id is not None:
        print(f"The '{experiment}' runs: {ui_url(base, experiment_id)}")
    server = _start_server_group(cmd)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_process_group(server)


def _start_server_group(cmd: list[str]) -> subprocess.Popen:
    """Start a server (`mlflow ui`, `prefect server start`: each forks workers of its own) in a
    process group of its own, and turn SIGTERM and SIGHUP into KeyboardInterrupt so that the
    caller's `finally: _stop_process_group(...)` runs however this command is stopped: no
    server outlives it."""
    server = subprocess.Popen(cmd, start_new_session=True)
    _stop_on_sigterm()
    return server


def _stop_process_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the group, wait for every member to exit, SIGKILL what is left after grace_s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        process.poll()  # reap the leader, or the group never looks empty
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _schedule(args) -> int:
    if not os.environ.get("PREFECT_API_URL"):
        print("bvpo: error: a schedule needs a running Prefect server: `bvpo stack up` (team mode), "
              "`stack.prefect_api_url` in params.yaml, `export PREFECT_API_URL=http://127.0.0.1:4200/api` after "
              "`prefect server start`, or `bvpo serve` (`make serve`) to start a server and the schedule together.",
              file=sys.stderr)
        return EXIT_USAGE
    from prefect.deployments.runner import EntrypointType

    from .config import load_params
    from .flow import bvpo_pipeline
    from .stack import endpoints

    root = Path(args.project_dir).resolve()
    when = {"interval": args.interval} if args.interval else {"cron": args.cron or "0 3 * * *"}
    pool = None if getattr(args, "serve_here", False) else \
        endpoints(root, load_params(root / "params.yaml").stack)["work_pool"]
    if pool:
        # The worker runs the module `bvpo.flow` in this checkout, with this checkout's own venv
        # when it has one (its code, which its dvc.lock records), else the worker's environment.
        job = {"working_dir": str(root)}
        venv_python = root / ".venv" / "bin" / "python"
        if venv_python.is_file():
            job["command"] = f"{venv_python} -m prefect.engine"
        deployment_id = bvpo_pipeline.deploy(
            name=args.name, work_pool_name=pool, parameters={"project_dir": str(root)}, job_variables=job, entrypoint_type=EntrypointType.MODULE_PATH, build=False,
            push=False, print_next_steps=False, ignore_warnings=True, **when)
        print(f"Deployment bvpo-pipeline/{args.name} ({deployment_id}) on work pool {pool!r}, "
              f"{'every %gs' % args.interval if args.interval else 'cron ' + when['cron']}: the pool's workers run "
              f"the rounds in {root}. Run one now: prefect deployment run bvpo-pipeline/{args.name}")
        return 0
    # limit=1: one round at a time (the project lock refuses a second one anyway).
    bvpo_pipeline.serve(name=args.name, parameters={"project_dir": str(root)}, limit=1,
                        entrypoint_type=EntrypointType.MODULE_PATH, **when)
    return 0


def _stack(args) -> int:
    from . import stack
    from .config import load_params

    root = Path(args.project_dir).resolve()
    if args.action == "up":
        ports = stack.Ports(postgres=args.postgres_port, mlflow=args.mlflow_port, prefect=args.prefect_port)
        print("Starting the stack (PostgreSQL, MLflow server, Prefect server, worker) on 127.0.0.1 ...", flush=True)
        state = stack.up(root, Path(args.data_dir) if args.data_dir else None, ports, args.artifacts,
                         args.database_url, args.workers)
        print(f"MLflow:  {state['tracking_uri']}   (artifacts: {state['mlflow']['artifacts']})")
        print(f"Prefect: {state['prefect']['url']}   (API {state['prefect_api_url']}, work pool "
              f"{state['work_pool']!r}, {len(state['workers'])} worker(s))")
        pg = state["postgres"]
        print("PostgreSQL: " + (pg["url"] if pg["managed"] else f"127.0.0.1:{pg['port']} (data {pg['data']}, "
                                f"password file {pg['passfile']})"))
        print(f"This project now uses the stack. Another clone: set params.yaml's stack.tracking_uri: "
              f"{state['tracking_uri']} and stack.prefect_api_url: {state['prefect_api_url']}. Schedule rounds: "
              "bvpo schedule --cron '0 3 * * *'. Stop: bvpo stack down.")
        return 0
    if args.action == "down":
        stopped = stack.down(root)
        print("Stopped: " + ", ".join(stopped) if stopped else "Nothing of the stack was running.")
        return 0
    rows = stack.status(root)
    for part, running, where in rows:
        print(f"{part:<11} {'running' if running else 'stopped':<8} {where}")
    if not rows:
        print("No local stack in this project (`bvpo stack up` starts one).")
    used = stack.endpoints(root, load_params(root / "params.yaml").stack if (root / "params.yaml").is_file() else None)
    print(f"This project logs to {used['tracking_uri'] or 'mlruns/ (SQLite)'} ({used['tracking_uri_from']}) and "
          f"orchestrates on {used['prefect_api_url'] or 'a temporary Prefect server per run'} "
          f"({used['prefect_api_url_from']}).")
    return 0


def _serve(args) -> int:
    """A Prefect server on loopback, then the schedule against it; both stop together."""
    url = f"http://127.0.0.1:{args.port}/api"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(args.port),
           "--analytics-off"]
    print(f"Prefect server on http://127.0.0.1:{args.port} (home {os.environ['PREFECT_HOME']})")
    server = _start_server_group(cmd)
    try:
        from .stack import wait_http

        wait_http(f"{url}/health", "Prefect server", server.pid, timeout_s=120)
        os.environ["PREFECT_API_URL"] = url
        args.serve_here = True  # this server lives as long as this command: no work pool behind it
        return _schedule(args)
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_process_group(server)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_environment(args.project_dir, getattr(args, "params", "params.yaml"))
    if args.command not in ("stack", "serve", "init"):
        from .stack import export_environment

        export_environment(Path(args.project_dir).resolve(), getattr(args, "params", "params.yaml"))
    handlers = {"stack": _stack, "run": _run, "stage": _stage, "experiment": _experiment, "ui": _ui, "schedule": _schedule,
                "serve": _serve, "init": _init, "check": _check, "champion": _champion}
    try:
        return handlers[args.command](args)
    except BvpoError as err:
        print(f"bvpo: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bvpo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
