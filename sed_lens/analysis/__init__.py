"""Analysis: rolling SED directions, LCH centroids, SED–LCH coupling."""
