//! Python bindings for the agent runtime (module `agent_runtime`, native part `_agent_runtime`).

use pyo3::prelude::*;

/// The native module behind `agent_runtime`.
#[pymodule]
fn _agent_runtime(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
