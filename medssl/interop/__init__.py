"""Running other projects' published models in medssl.

CineMA (Fu et al., 2025, https://arxiv.org/abs/2506.00679): :func:`load_cinema` loads a published checkpoint and its
``config.yaml`` into medssl's own network; :func:`import_cinema` writes it as a medssl bundle.
"""

from medssl.interop.cinema_bundle import import_cinema
from medssl.interop.cinema_import import load_cinema

__all__ = ["import_cinema", "load_cinema"]
