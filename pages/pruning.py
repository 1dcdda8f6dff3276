from pages import _technique

_technique.render("prune")
