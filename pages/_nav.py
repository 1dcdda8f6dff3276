"""The app's navigation: its fixed pages, and one page per registered technique (the registry is the list)."""
from __future__ import annotations

import functools

import streamlit as st

from core.techniques import get_technique, technique_names


def technique_page(name: str) -> st.Page:
    """The page of one technique: a callable page at the spec's URL, rendered by pages/_technique.py or by
    the module its spec names (`page`)."""
    import importlib
    spec = get_technique(name)
    view = importlib.import_module(spec.page or "pages._technique")
    return st.Page(functools.partial(view.render, name), title=spec.title, icon=spec.icon, url_path=spec.page_url)


def technique_pages() -> list[st.Page]:
    return [technique_page(n) for n in technique_names()]


def technique_links(container=None) -> None:
    """A link to every technique's page, side by side."""
    names = technique_names()
    for col, name in zip((container or st).columns(len(names)), names):
        spec = get_technique(name)
        col.page_link(technique_page(name), label=spec.title, icon=spec.icon)
