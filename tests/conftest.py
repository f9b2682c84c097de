import signal

import pytest

from align_diffusion.models import adapter_for
from align_diffusion.models.tiny import FAMILIES, tiny_pipeline


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_as_from_a_terminal():
    """A suite started as a background job (no job control) inherits SIGINT ignored, and so would the processes its
    Ctrl-C tests start: those tests send SIGINT as a terminal would, to processes that take it as one."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_pipes():
    """One random-weight pipeline per family, built once per session."""
    return {name: tiny_pipeline(name) for name in FAMILIES}


@pytest.fixture
def tiny_adapter(tiny_pipes, family):
    return adapter_for(tiny_pipes[family])


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """Tiny SD3 and SD pipelines saved as diffusers folders."""
    paths = {}
    for name in ("sd3", "sd"):
        paths[name] = tmp_path_factory.mktemp(name)
        tiny_pipeline(name).save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    """Three prompts in a text file, for training runs."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\ntwo blue squares\na green triangle\n")
    return path
