"""The whole study from one config: `reproduce` runs the stages, `report` writes the report."""
