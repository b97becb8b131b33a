"""The audit trail: the records, their JSONL form, the SQL store and what reads it.

records.py is the seed's AuditEventType, AuditEvent and AuditLogger (the public
library face); store.py is the one writer and the read-only readers; the rest
answer questions over the stored rows (query, suggest, browse) or bring rows in
(importer) and age them out (retention).
"""
