import os

# Tiny models on a 2-core machine: one thread and passive OpenMP waits keep tests fast and deterministic.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Random-weight demo pipelines saved as diffusers folders <root>/sd and <root>/xl (distill and finetune runs)."""
    from lcmtool.demo.arch import build_pipeline

    root = tmp_path_factory.mktemp("teachers")
    for fam in ("sd", "xl"):
        build_pipeline(fam, seed=0).save_pretrained(root / fam)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A latent cache root shared by the runs of one test module."""
    return tmp_path_factory.mktemp("cache")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
