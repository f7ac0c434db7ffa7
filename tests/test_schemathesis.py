"""Schemathesis, a fuzzer nobody here wrote, drives the running server from its own OpenAPI document."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ragrt.serve.app import ServerConfig, create_app
from serving import running_server

pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
# Responses must be no 5xx, carry documented status codes and content types, and match their schemas.
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_no_server_errors_and_responses_match_the_spec(tiny_bundle, tmp_path):
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    with running_server(create_app(ServerConfig(bundle=str(tiny_bundle), threads=1))) as url:
        out = subprocess.run([cli, "run", f"{url}/openapi.json", "--checks", CHECKS, "--max-examples", "25",
                              "--seed", "7", "--generation-deterministic", "--no-color"],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)   # its cache stays out of the tree
    assert out.returncode == 0, out.stdout[-4000:]
    assert "generated" in out.stdout and "passed" in out.stdout
