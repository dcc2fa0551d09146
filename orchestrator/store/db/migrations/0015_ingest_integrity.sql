-- Ingest integrity (issue 15): who a study belongs to, and what an instance holds.

-- Keyed SHA-256 digests (orchestrator/ingest_rules.py), never the values: the PatientID, and
-- the PatientName + PatientBirthDate, of the study's first instance that carried them. An
-- instance claiming the study with another patient is refused.
ALTER TABLE studies ADD COLUMN patient_id_key text;
ALTER TABLE studies ADD COLUMN patient_demo_key text;

-- The SOP class, image size and pixel data as encoded, digested: the same SOPInstanceUID
-- again with the same content is a duplicate, with other content a conflict. NULL for
-- instances stored before this migration.
ALTER TABLE instances ADD COLUMN content_sha256 text;
