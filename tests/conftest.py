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
