import os
import tempfile

# Inductor's caches live in a directory this run owns: a cache hit from another run
# would skip code generation (and anything a test inspects about it).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lordo-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def pytest_configure(config):
    device = os.environ.get("LORDO_TEST_DEVICE", "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise pytest.UsageError(f"LORDO_TEST_DEVICE={device!r} is not usable here: {error}") from error
