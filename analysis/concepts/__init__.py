"""The concept study: how few concepts neighbourhoods share (against random and same-label baselines), O1, concept
names, the per-image query and its contact sheet. Entry points: ``sharing.concept_study``, ``query.QueryEngine``,
``sheet.contact_sheet``, ``naming.ConceptNamer``."""
