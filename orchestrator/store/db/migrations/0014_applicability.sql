-- Applicability (clinical-safety issue): an image that no model set was made for ends
-- 'not_applicable' (the instance, with the failed rules in words in `error`), and a study
-- with no applicable image ends 'not_applicable' too — never 'done', never "normal".
ALTER TABLE studies DROP CONSTRAINT IF EXISTS studies_status_check;
ALTER TABLE studies ADD CONSTRAINT studies_status_check
    CHECK (status IN ('received', 'queued', 'processing', 'done', 'failed', 'needs_review',
                      'not_applicable'));
ALTER TABLE instances DROP CONSTRAINT IF EXISTS instances_status_check;
ALTER TABLE instances ADD CONSTRAINT instances_status_check
    CHECK (status IN ('stored', 'done', 'failed', 'not_applicable'));
