"""Model Compression Lab core: datasets, models, training, metrics, cache, techniques.

No Streamlit here: the app's pages, the CLI (`python -m core`) and the tests all call these.
"""
import os as _os

__version__ = "0.9.0"   # model cards and exports record it (core.export.lab_version)

# OpenMP threads sleep instead of spinning while they wait: with other programs on the cores,
# spinning made 2-thread training 5x slower here (docs/teachers.md). Only applies if torch is
# not imported yet; set OMP_WAIT_POLICY=ACTIVE to opt out.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .datasets import DATASETS, DEFAULT_DATASET, DataBundle, load_dataset
from .errors import CorruptCacheEntry, DataUnavailable, InvalidParameter, LabError
from .models import DEFAULT_STUDENT, DEFAULT_TEACHER, MODELS, STUDENTS, TEACHERS, build_model
from .progress import Event
from .teachers import Teacher, TeacherSettings, get_teacher, latest_teacher
from .training import TrainConfig, fit

__all__ = ["DATASETS", "DEFAULT_DATASET", "DataBundle", "load_dataset", "LabError", "InvalidParameter",
           "DataUnavailable", "CorruptCacheEntry", "MODELS", "TEACHERS", "STUDENTS", "DEFAULT_TEACHER",
           "DEFAULT_STUDENT", "build_model", "Event", "Teacher", "TeacherSettings", "get_teacher",
           "latest_teacher", "TrainConfig", "fit"]
