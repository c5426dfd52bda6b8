"""benchmarks/gpu_kit.py: which packages travel as wheels to a GPU machine that cannot download."""

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_kit  # noqa: E402

ENV = gpu_kit.target_environment("3.12")


def fake_walk(roots, graph, versions):
    return gpu_kit.walk([Requirement(r) for r in roots], versions.get, lambda n: graph.get(n, []), ENV)


def test_walk_follows_extras_and_markers_once():
    graph = {
        "app": ["lib>=2", "winonly; sys_platform == 'win32'", "plug[fast]; extra == 'plugins'"],
        "lib": ["app"],  # a cycle
        "plug": ["base<3", "speed; extra == 'fast'"],
        "speed": [],
        "base": [],
    }
    versions = {"app": "1.0", "lib": "2.1", "plug": "0.5", "speed": "1.0", "base": "2.9"}
    found, wanted = fake_walk(["app[plugins]"], graph, versions)
    assert found == {"app": "1.0", "lib": "2.1", "plug": "0.5", "speed": "1.0", "base": "2.9"}
    assert [str(r) for r in wanted["base"]] == ["base<3"]
    # Without the extra, its dependencies are not wanted; the Windows-only one never is.
    found, _ = fake_walk(["app"], graph, versions)
    assert set(found) == {"app", "lib"}


def test_a_missing_package_is_recorded_not_followed():
    found, wanted = fake_walk(["app"], {"app": ["gone>=1"]}, {"app": "1"})
    assert found["gone"] is None and str(wanted["gone"][0]) == "gone>=1"


def test_carry_what_the_image_lacks_or_has_at_a_refused_version():
    found = {"torch": "2.13.0", "nvidia-cublas": "13.1", "transformers": "5.24.0", "datasets": "5.2.0",
             "fsspec": "2026.9.0", "numpy": "2.4.6", "pyarrow": "25.0.1", "huggingface-hub": "2.4.0"}
    wanted = {name: [Requirement(name)] for name in found}
    wanted["fsspec"] = [Requirement("fsspec<=2026.9.0,>=2023.1.0")]
    wanted["huggingface-hub"] = [Requirement("huggingface-hub<3.0,>=1.31.0")]
    image = {"torch": "2.11.0", "transformers": "5.17.0", "fsspec": "2026.11.0", "numpy": "2.5.2", "pyarrow": None,
             "huggingface-hub": "1.33.0"}
    carry = gpu_kit.to_carry(found, wanted, image)
    # torch and its CUDA libraries: the image's; transformers: always ours; datasets: missing
    # there; fsspec: the image's is newer than datasets accepts; numpy, hub: the image's
    # satisfies; pyarrow: version not recorded, trusted.
    assert carry == {"transformers": "5.24.0", "datasets": "5.2.0", "fsspec": "2026.9.0"}


def test_a_requirement_not_installed_here_stops_the_build():
    with pytest.raises(SystemExit, match="gone is required but not installed here"):
        gpu_kit.to_carry({"gone": None}, {"gone": [Requirement("gone")]}, {})


def test_the_projects_own_requirements_resolve_here(tmp_path):
    """What `build` would carry for the recorded image, from this environment's metadata: the
    packages the GPU image lacks, and none of the orchestration ones. `make install` (what the
    tests run in) installs no `bench` extra, so the walk here is of the runtime dependencies;
    `make gpu-kit` installs trl before its walk."""
    pytest.importorskip("tomllib")  # pyproject.toml is read with Python 3.11's tomllib
    roots = {gpu_kit.normalize(r.name) for r in gpu_kit.root_requirements()}
    assert {"transformers", "datasets", "mlflow", "math-verify", "trl"} <= roots
    assert not roots & {"prefect", "dvc", "psycopg"}
    runtime = gpu_kit.root_requirements(extras=())
    assert "trl" not in {gpu_kit.normalize(r.name) for r in runtime}
    found, wanted = gpu_kit.walk(runtime, gpu_kit._installed_version, gpu_kit._requires, ENV)
    image = gpu_kit.read_image(gpu_kit.ROOT / "benchmarks" / "gpu_image.txt")
    assert image["torch"] == "2.11.0" and image["transformers"] == "5.17.0"
    carry = gpu_kit.to_carry(found, wanted, image)
    assert {"datasets", "mlflow", "math-verify", "transformers"} <= set(carry)
    assert not {"torch", "numpy", "accelerate", "prefect", "dvc"} & set(carry)
    assert gpu_kit.unmet(found, wanted) == []  # what the tests run here meets its own requirements


def test_without_the_bench_extra_the_build_says_how_to_get_it():
    """trl is not installed by `make install`: the walk finds it missing and the build stops with the
    command that installs it, whatever this environment has."""
    pytest.importorskip("tomllib")
    found, wanted = gpu_kit.walk(gpu_kit.root_requirements(), lambda name: None if name == "trl" else
                                 gpu_kit._installed_version(name), gpu_kit._requires, ENV)
    assert found["trl"] is None
    with pytest.raises(SystemExit, match="trl is required but not installed here: run `make gpu-kit`"):
        gpu_kit.to_carry(found, wanted, {})


def test_unmet_names_what_is_missing_or_refused_and_survives_odd_versions():
    wanted = {name: [Requirement(f"{name}{spec}")] for name, spec in
              (("pyarrow", "<26,>=4"), ("gone", ">=1"), ("numpy", ">=1.17"), ("torch", "==2.13.0"), ("ok", ">=1"))}
    wanted["pyarrow"].append(Requirement("pyarrow>=21"))
    found = {"pyarrow": "26.0.1", "gone": None, "numpy": "9.9-custom", "torch": "2.11.0", "ok": "1.2"}
    assert gpu_kit.unmet(found, wanted) == [
        "gone: missing (wanted by gone>=1)",
        "numpy 9.9-custom: does not meet numpy>=1.17",  # not PEP 440: reported, not a crash
        "pyarrow 26.0.1: does not meet pyarrow<26,>=4",  # the other requirement on it is met
    ]  # torch: the image's own, whatever its version


def test_a_pip_freeze_reads_as_an_image(tmp_path):
    listing = tmp_path / "freeze.txt"
    listing.write_text("# comment\nTorch==2.11.0\nmy_pkg @ file:///wheels/my_pkg-1.0-py3-none-any.whl\n"
                       "-e git+https://example.invalid/x.git#egg=x\nnumpy\n")
    assert gpu_kit.read_image(listing) == {"torch": "2.11.0", "my-pkg": None, "numpy": None}
