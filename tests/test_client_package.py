"""The client package stands alone: it needs httpx and the standard library, never the server."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clients" / "python"


def test_the_only_dependency_is_httpx_and_the_package_is_typed() -> None:
    project = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    assert project["name"] == "textgen-client"
    assert project["dependencies"] == ["httpx>=0.27"]
    assert (PACKAGE / "src" / "textgen_client" / "py.typed").exists()


def test_modules_import_only_httpx_and_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"httpx", "textgen_client"}
    for module in (PACKAGE / "src" / "textgen_client").glob("*.py"):
        tree = ast.parse(module.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{module.name} imports {name}"


def test_imports_and_verifies_with_the_server_package_unimportable() -> None:
    code = (
        "import sys\n"
        "sys.modules['textgen'] = None\n"  # any import of the server now fails
        "import textgen_client\n"
        "from textgen_client.webhooks import sign\n"
        "secret = 'whsec_' + 'QUJD' * 8\n"
        "sig = sign(secret, 'msg_1', 1700000000, b'{\"id\": \"t1\"}')\n"
        "headers = {'webhook-id': 'msg_1', 'webhook-timestamp': '1700000000', 'webhook-signature': sig}\n"
        'message = textgen_client.verify_webhook(headers, b\'{"id": "t1"}\', secret, now=1700000000)\n'
        "server = [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] == 'textgen']\n"
        "print(message.task.id, server)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "t1 []"
