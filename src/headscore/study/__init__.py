"""The whole study from one config: `reproduce` validates the config and runs the stages (`stages` names them),
`report` writes the report."""

from headscore.core.exports import lazy_exports

# lazy: importing the package imports none of its modules (fast `headscore --help`, no cycles)
__all__, __getattr__ = lazy_exports(__name__, {
    "stages": ["STAGES"],
    "reproduce": ["Study", "StudyConfig", "load_config", "run_study"],
    "report": ["write_report"],
})
