"""Griffe extension for the API reference: read ``Example:`` as Google's ``Examples:``.

The package docstrings introduce their doctests with ``Example:``, which Google-style
parsing takes as a free-text admonition (``>>>`` lines would render as quotes); griffe's
examples section is called ``Examples:``. Only the rendered docs are affected.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class GoogleExamples(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
