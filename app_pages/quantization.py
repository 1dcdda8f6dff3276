from app_pages import _technique

_technique.render("quantize")
