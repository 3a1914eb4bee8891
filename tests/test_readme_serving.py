"""The README's serving section, run as written: its `slimtune serve` line (the tiny built-in model and two tiny
adapters in place of the 8B paths, a free port), its curl command and its `openai` snippet, against the real server."""
import json
import re
import subprocess
import sys
from pathlib import Path

from serve_helpers import free_port, make_adapters, server_process

README = Path(__file__).resolve().parents[1] / "README.md"


def serving_blocks() -> tuple[list[str], str]:
    """(the bash block's commands with continuation lines joined, the python block) of README's serving section."""
    section = README.read_text().split("## Serving", 1)[1].split("\n## ", 1)[0]
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return [c.strip() for c in bash.replace("\\\n", " ").splitlines() if c.strip()], python


def test_readme_serving_commands_work(tmp_path):
    (serve, curl), snippet = serving_blocks()
    assert serve.startswith("slimtune serve ") and curl.startswith("curl ")
    ads = make_adapters(tmp_path, ("a0", "a1"))
    port = free_port()
    here = lambda text: text.replace("127.0.0.1:8000", f"127.0.0.1:{port}")  # noqa: E731
    serve = serve.replace("slimtune serve", f"{sys.executable} -m slimtune serve", 1)
    serve = re.sub(r"--model \S+", "--model builtin", serve)
    serve = serve.replace("out/support/adapter", ads["a0"]).replace("out/sql/adapter", ads["a1"])
    with server_process(f"{serve} --port {port} --max-len 256 --log-level warning", port, shell=True):
        r = subprocess.run(here(curl), shell=True, capture_output=True, text=True, timeout=60)
        answer = json.loads(r.stdout)
        assert r.returncode == 0 and answer["model"] == "sql" and answer["usage"]["completion_tokens"] >= 1, r.stdout
        out = subprocess.run([sys.executable, "-c", here(snippet)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.endswith("\n"), out.stderr  # the answer printed (random model: any text)

