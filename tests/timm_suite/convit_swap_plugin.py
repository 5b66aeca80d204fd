"""A pytest plugin that runs timm's own model tests on swapped ConViTs.

Loaded with ``-p convit_swap_plugin`` (this folder on ``PYTHONPATH``) next to timm's
``tests/test_models.py`` from timm's sdist. With ``CONVIT_SWAP_BACKEND=<backend>`` set, every
``timm.create_model`` call that builds a ConViT returns it passed through
``convit.swap_gpsa(model, backend=<backend>)``; unset or empty, the plugin changes nothing (the
baseline run). ``.ci/run`` runs timm's tests once plain and once per backend and compares the sets
of passed tests (``tests/timm_suite/compare.py``).

With ``CONVIT_SWAP_REPORT=FILE`` set, the plugin writes the outcome of every test, the backend and
how many ConViTs it swapped to FILE (JSON), for ``compare.py``.

Not a test module of ours: pytest never collects this folder's files as tests (their names do not
start with ``test_``), and the project's own suite does not load the plugin.
"""
import functools
import json
import os

BACKEND = os.environ.get("CONVIT_SWAP_BACKEND", "")
_swapped = []
_outcomes = {}  # test node id -> "passed" / "failed" / "skipped"


def _wrap(create_model):
    @functools.wraps(create_model)
    def create_and_swap(*args, **kwargs):
        import convit

        model = create_model(*args, **kwargs)
        # features_only ConViTs wrap the model (FeatureGetterNet): swap_gpsa walks every submodule.
        if any(type(m).__name__ == "GPSA" for m in model.modules()):
            convit.swap_gpsa(model, backend=BACKEND)
            _swapped.append(type(model).__name__)
        return model

    return create_and_swap


def pytest_configure(config):
    if not BACKEND:
        return
    import timm
    import timm.models

    # Patched before timm's test module is imported, so its `from timm import create_model` binds
    # the wrapper; timm.models.create_model (the factory's home) is patched for callers using it.
    wrapped = _wrap(timm.create_model)
    timm.create_model = wrapped
    timm.models.create_model = wrapped


def pytest_report_header(config):
    return f"convit_swap_plugin: swap_gpsa backend = {BACKEND or '(none: timm model as built)'}"


def pytest_runtest_logreport(report):
    # A test failed if any phase failed; it passed if its call phase passed.
    if report.failed:
        _outcomes[report.nodeid] = "failed"
    elif report.skipped:
        _outcomes.setdefault(report.nodeid, "skipped")
    elif report.when == "call":
        _outcomes.setdefault(report.nodeid, "passed")


def pytest_terminal_summary(terminalreporter):
    if BACKEND:
        terminalreporter.write_line(f"convit_swap_plugin: swapped {len(_swapped)} models to backend {BACKEND!r}")
    path = os.environ.get("CONVIT_SWAP_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"backend": BACKEND, "swapped_models": len(_swapped), "outcomes": _outcomes}, f, indent=1)
