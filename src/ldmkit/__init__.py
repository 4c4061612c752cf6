from importlib.metadata import version as _v

from .cpu import request_huge_pages

request_huge_pages()  # before torch is imported: PyTorch reads the setting once

__version__ = _v("ldmkit")
