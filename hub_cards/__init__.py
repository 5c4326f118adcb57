"""Model card templates (Jinja), shipped as the package ariadne_hf.bundle.hub_cards (see pyproject.toml)."""
