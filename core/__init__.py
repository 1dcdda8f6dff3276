"""Model Compression Lab core: datasets, models, training, metrics, cache, techniques.

No Streamlit here: the app's pages, the CLI (`python -m core`) and the tests all call these.
"""
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
