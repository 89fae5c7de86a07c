"""A task module that only ``test_children_preload_the_allowed_modules`` names in ``--allow``."""


def hello() -> str:
    return "hello"
