"""Writers: a Case and its pixels -> files (DICOM marked synthetic, PNG, masks), with deterministic bytes."""
