"""Input schema for one row, as Katonic's custom-model template expects (pydantic)."""

from pydantic import BaseModel, ConfigDict, Field


class IrisMeasurements(BaseModel):
    """Flower measurements in centimetres."""

    model_config = ConfigDict(extra="forbid")

    sepal_length: float = Field(gt=0, lt=100)
    sepal_width: float = Field(gt=0, lt=100)
    petal_length: float = Field(gt=0, lt=100)
    petal_width: float = Field(gt=0, lt=100)
