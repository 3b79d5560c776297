"""Run ``python -m kvbridge.connector.serving.cli ARGV`` for many ARGVs, paying the
interpreter and torch import once: import the CLI, then fork one child per ARGV that
runs ``cli.main`` (the module's ``__main__``) with its stderr and stdout in files.

    python startup_runner.py CASES.json OUT.json

CASES.json: ``{name: argv}``; OUT.json: ``{name: {"rc", "stdout", "stderr"}}``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from kvbridge.connector.serving import cli  # the import the children share


def run(argv: list[str], workdir: str, name: str) -> dict:
    out_path, err_path = f"{workdir}/{name}.out", f"{workdir}/{name}.err"
    pid = os.fork()
    if pid == 0:  # child: the CLI as `python -m`, exit code from SystemExit or os._exit
        with open(out_path, "w") as out, open(err_path, "w") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
        sys.argv = ["kvbridge", *argv]
        code = 1
        try:
            code = cli.main(argv)  # what `python -m ...cli` runs: sys.exit(main())
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    with open(out_path) as out, open(err_path) as err:
        return {"rc": os.waitstatus_to_exitcode(status), "stdout": out.read(), "stderr": err.read()}


def main() -> None:
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    with tempfile.TemporaryDirectory() as workdir:
        results = {
            name: run(argv, workdir, f"case{i}") for i, (name, argv) in enumerate(cases.items())
        }
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
