"""The `ms1m_arcface` dataset (insightface MS1M-ArcFace / MS1MV3 folders)."""
