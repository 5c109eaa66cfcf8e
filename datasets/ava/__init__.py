"""AVA: the csv / pbtxt / detections readers (``files``), the keyframe dataset (``dataset``) and the splits a run
reads (``splits``)."""
