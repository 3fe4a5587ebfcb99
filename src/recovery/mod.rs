//! Recovery points of a mirror's replica, kept as undo deltas: taking a point
//! copies nothing; the first overwrite of a chunk after the newest point saves
//! the chunk's old contents to that point's undo log. The same logs serve as
//! the resync undo log (a point of kind `Resync`).

pub mod points;
pub mod restore;
pub mod verify;
mod verify_offline;
