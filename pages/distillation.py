from pages import _technique

_technique.render("distill")
