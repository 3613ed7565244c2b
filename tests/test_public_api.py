"""The public API: ``twa_ray.__all__`` is the documented list, every name resolves (lazily), the
callbacks share one name and one default."""

import inspect
import subprocess
import sys

import twa_ray

DOCUMENTED = [
    "CandidateStore",
    "Snapshotter",
    "TWA",
    "TWAConfig",
    "__version__",
    "import_checkpoints",
    "learn",
    "snapshot",
]


def test_all_is_the_documented_list():
    assert twa_ray.__all__ == DOCUMENTED
    for name in DOCUMENTED:
        if name != "__version__":
            assert f":{'class' if name[0].isupper() else 'func'}:`{name}`" in twa_ray.__doc__
    from twa_ray.core.twa import TWA
    from twa_ray.store.snapshots import snapshot
    from twa_ray.train import learn

    assert (twa_ray.TWA, twa_ray.snapshot, twa_ray.learn) == (TWA, snapshot, learn)
    assert all(getattr(twa_ray, n) is not None for n in DOCUMENTED)


def test_import_twa_ray_imports_neither_torch_nor_ray():
    code = "import sys, twa_ray; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_the_callbacks_share_a_name_and_their_defaults():
    import pytest

    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    from twa_ray.integrations import hf, lightning

    params = [inspect.signature(m.TWACallback).parameters for m in (lightning, hf)]
    for name in ("store", "every_n_steps", "every_n_epochs", "sample_frac", "mode", "loss_fn"):
        assert params[0][name].default == params[1][name].default, name
    assert params[0]["mode"].default == "twa-v"
    with pytest.deprecated_call():
        assert lightning.TWA is lightning.TWACallback
