"""Scheduled runs: serve the pipeline flow as a Prefect deployment on a cron schedule.

    prefect server start &                                   # schedules need a real server
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python flows/deployments.py --cron "0 3 * * *"            # or: bvpo schedule --cron ...

The served process polls the server and starts a flow run at each scheduled time; runs also
start on demand from the Prefect UI ("Run" on the deployment) or `prefect deployment run`.
"""

import argparse
from pathlib import Path

from bvpo.runtime import configure_environment

configure_environment()

from bvpo.flow import bvpo_pipeline  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cron", default="0 3 * * *")
    parser.add_argument("--name", default="bvpo-scheduled")
    args = parser.parse_args()
    project = Path(__file__).resolve().parent.parent
    bvpo_pipeline.serve(name=args.name, cron=args.cron, parameters={"project_dir": str(project)})
