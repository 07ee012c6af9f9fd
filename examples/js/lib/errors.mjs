// The one error type of the library (Node and browser entries alike): a message that says what
// failed and, where there is one, a hint that says what to do about it.

export class BundleError extends Error {
  constructor(message, hint) {
    super(message);
    this.hint = hint;
  }
}

/** A bad request from the caller (unknown adapter, empty prompt), not a bad bundle. */
export class UsageError extends BundleError {}
