"""Suite-wide settings."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches (decoded images) go to a folder of this test session, not the user's ~/.cache/cxrkit."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CXR_CACHE_DIR", str(tmp_path_factory.mktemp("cxr-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A binary run of a tiny random-weight mobilenet_v3_small at 48 px, trained one epoch per stage (shared, so
    tests must not change it)."""
    from pathlib import Path

    from synth import kermany_folder
    from typer.testing import CliRunner

    from cxrkit.cli.main import app

    data = kermany_folder(tmp_path_factory.mktemp("tiny-xray"), per_class=10, size=48)
    result = CliRunner().invoke(app, [
        "train", "--data", str(data), "--out", str(tmp_path_factory.mktemp("tiny-runs")),
        "--backbone", "mobilenet_v3_small", "--weights", "none", "--set", "model.image_size=48",
        "--set", "runtime.batch_size=8", "--set", "runtime.workers=0",
        "--set", "stages.0.epochs=1", "--set", "stages.1.trainable=head", "--set", "stages.1.epochs=1"])
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny_multilabel_run(tmp_path_factory):
    """A multi-label run (the 14 ChestX-ray14 findings, from :func:`synth.nih_csv`) of a tiny random-weight
    mobilenet_v3_small at 32 px, trained one epoch (shared, so tests must not change it; see
    :func:`synth.with_logits` for a copy that answers chosen probabilities)."""
    from pathlib import Path

    from synth import nih_csv
    from typer.testing import CliRunner

    from cxrkit.cli.main import app

    data = nih_csv(tmp_path_factory.mktemp("tiny-nih"))
    result = CliRunner().invoke(app, [
        "train", "--data", str(data), "--task", "multilabel", "--out", str(tmp_path_factory.mktemp("tiny-ml-runs")),
        "--backbone", "mobilenet_v3_small", "--weights", "none", "--set", "model.image_size=32",
        "--set", "runtime.batch_size=8", "--set", "runtime.workers=0", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])
