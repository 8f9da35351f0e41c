import pytest


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The real offline teacher written once per session as an HF checkpoint (about 30 s: GGUF dequantisation)."""
    from m1_plugins.teacher import write_teacher

    return write_teacher(tmp_path_factory.mktemp("teacher") / "smollm2")
