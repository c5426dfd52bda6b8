"""Scheduled rounds: serve the pipeline flow (one round per run) as a Prefect deployment.

    prefect server start &                                   # schedules need a real server
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python flows/deployments.py --cron "0 3 * * *"            # same as: bvpo schedule --cron ...

or `bvpo serve` / `make serve` to start the server and the schedule together. The served
process polls the server and starts a flow run at each scheduled time; runs also start on
demand from the Prefect UI ("Run" on the deployment) or `prefect deployment run`.
"""

import sys
from pathlib import Path

from bvpo.cli import main

if __name__ == "__main__":
    project = Path(__file__).resolve().parent.parent
    sys.exit(main(["--project-dir", str(project), "schedule", *sys.argv[1:]]))
