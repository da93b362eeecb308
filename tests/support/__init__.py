"""Helpers the tests share (not tests themselves): DICOM and image builders, the mutation corpus,
tiny models and their fixtures, loopback servers and peers (OpenAI-compatible chat, fake hub,
Storage SCP, stalled peers), Orthanc and the ``cxr-agent serve`` subprocess harness."""
