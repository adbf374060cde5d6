"""python -m sugarize: the command-line tool.

``python -m`` puts the current folder first on ``sys.path``; a user's folder holds model and
data files, and an ``openvino.py`` or ``onnx.py`` there must never stand in for a module the
tool imports later. So it comes off the path first, as ``python -m pip`` does (sugarize itself
is imported already). The model's own folder is on the path only while its file is imported
and its factory runs (``files/modelfile.user_folders``); later imports of its modules go through
the closure's finder (``files/closure.py``), which never serves a module named like one the tool
imports.
"""

import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()):
    sys.path.pop(0)

from .app.cli import main  # noqa: E402

main()
