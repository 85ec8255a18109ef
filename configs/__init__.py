"""Model/training presets as YAML (`tiny`, `small`, `170m`, `340m`, `760m`), installed as the package
data `titans.presets` (see pyproject.toml) so `titans.load_preset` finds them in any install."""
