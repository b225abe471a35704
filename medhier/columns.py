"""Column names of the rows that flow between the platform's stages (constants, never scattered
strings): listing -> decode -> cache rows -> training batches -> report rows. A task's own columns
(the classifier's labels and predictions) live in its package.
"""

# Identity of the source object.
PATH = "path"  # relative to the archive root, "/"-separated
SIZE = "size"  # bytes
ETAG = "etag"  # S3 ETag; empty for local files
MTIME = "mtime"  # modification time, seconds since the epoch (float)

# DICOM metadata (pseudonymous; raw patient identifiers never leave medhier.dicom).
SOP_INSTANCE_UID = "sop_instance_uid"
STUDY_INSTANCE_UID = "study_instance_uid"
SERIES_INSTANCE_UID = "series_instance_uid"
MODALITY = "modality"
BODY_PART = "body_part"
MANUFACTURER = "manufacturer"
PIXEL_SPACING = "pixel_spacing"  # mm between pixel centres (mean of PixelSpacing's two values); NaN when absent
STUDY_DATE = "study_date"  # StudyDate as written (YYYYMMDD), "" when absent
PATIENT_KEY = "patient_key"
FRAME = "frame"  # frame number within a multi-frame object (0-based)
NUM_FRAMES = "num_frames"
ROWS = "rows"
COLUMNS = "columns"
PHOTOMETRIC = "photometric"
TRANSFER_SYNTAX = "transfer_syntax"
WINDOW_SOURCE = "window_source"  # config:<modality> | file | percentile | minmax | color

# Decode outcome: every input object yields at least one row, ok or error.
STATUS = "status"
STATUS_OK = "ok"
STATUS_ERROR = "error"
REASON = "reason"  # short rejection code, see medhier.io.dicom.REASONS
ERROR = "error"  # human-readable message

# Preprocessed image: uint8, image_size x image_size, one grey channel, row-major bytes.
IMAGE = "image"
# Its grey levels, mean and standard deviation in [0, 1] (NaN on error rows): drift features.
INTENSITY_MEAN, INTENSITY_STD = "intensity_mean", "intensity_std"
IMAGE_STATS = (INTENSITY_MEAN, INTENSITY_STD)

SPLIT = "split"  # train | val | test (patient-level)
SPLITS = ("train", "val", "test")

# Every report row of a batch job (a task adds its own prediction columns).
ERROR_REASON, ERROR_MESSAGE = "error_reason", "error_message"  # the rejection code and message; null on ok rows
MODEL_ID, MODEL_VERSION = "model_id", "model_version"  # the weights' content hash; its label
RUN_ID, SCORED_AT = "run_id", "scored_at"  # the run; when the model scored the row's batch

# Columns every decoded row carries besides the image and labels, in report order.
META_COLUMNS = (
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    SERIES_INSTANCE_UID,
    MODALITY,
    BODY_PART,
    MANUFACTURER,
    PIXEL_SPACING,
    STUDY_DATE,
    PATIENT_KEY,
    FRAME,
    NUM_FRAMES,
    ROWS,
    COLUMNS,
    PHOTOMETRIC,
    TRANSFER_SYNTAX,
    WINDOW_SOURCE,
)
