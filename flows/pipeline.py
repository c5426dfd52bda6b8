"""The whole BVPO pipeline as a Prefect flow (`bvpo run` calls the same flow).

    python flows/pipeline.py            # run once on params.yaml, like `bvpo run`

The flow itself lives in `bvpo.flow` so that the console script and this file share it.
"""

from bvpo.runtime import configure_environment

configure_environment()

from bvpo.flow import bvpo_pipeline  # noqa: E402

if __name__ == "__main__":
    bvpo_pipeline()
