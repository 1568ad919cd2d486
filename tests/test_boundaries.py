"""Architecture rules that a test can check."""

import subprocess
import sys


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet) and return what it printed."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_importing_the_library_never_loads_prefect():
    code = (
        "import importlib, pkgutil, sys, dpops\n"
        "for m in pkgutil.iter_modules(dpops.__path__):\n"
        "    importlib.import_module('dpops.' + m.name)\n"
        "print('prefect' in sys.modules)\n"
    )
    assert _fresh_python(code) == "False"


def test_ledger_clients_do_not_load_torch():
    code = (
        "import sys\n"
        "import dpops.ledger.store\nfrom dpops.privacy import accounting\n"
        "accounting.epsilon([accounting.SubsampledGaussian(1.0, 0.01, 10)], delta=1e-5)\n"
        "print('torch' in sys.modules)\n"
    )
    assert _fresh_python(code) == "False"
