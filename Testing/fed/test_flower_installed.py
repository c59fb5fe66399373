"""CI installs uharmony[fed]: without the pinned Flower every federation test must fail, not skip."""


def test_flower_is_installed_at_the_pinned_version():
    from importlib.metadata import version

    assert version("flwr") == "1.41.0"
