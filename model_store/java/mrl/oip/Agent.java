package mrl.oip;

import java.io.IOException;
import java.io.InputStream;
import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.security.ProtectionDomain;
import java.util.function.UnaryOperator;

/**
 * A Java agent that gives TorchServe 0.12 the Open Inference Protocol's model routes.
 *
 * <p>TorchServe answers GET /v2/models/{m} (model metadata) and GET /v2/models/{m}/ready with 404,
 * and its endpoint plugins cannot take them: a plugin registered for "v2" would also catch
 * POST /v2/models/{m}/infer ahead of the inference handler. So this agent swaps, as the JVM loads
 * it, the frontend's own OIP handler class (the last link of the inference chain, which sees only
 * what no other handler took) for ours, compiled against the pinned jar (model_store/oip_agent.py).
 * Started with -javaagent:mrl-oip.jar (vmargs in config.properties).
 *
 * <p>With -Dmrl.batching=greedy it also sends the queue polls of TorchServe's Model class to
 * {@link GreedyBatching}: a worker takes what is queued and never waits for more. With
 * -Dmrl.send=inline a WorkerThread writes each batch to its worker itself ({@link InlineSend}).
 */
public final class Agent {
    static final String TARGET = "org/pytorch/serve/http/api/rest/OpenInferenceProtocolRequestHandler";
    static final String REPLACEMENT = "mrl/oip/OpenInferenceProtocolRequestHandler.bin";

    private Agent() {}

    public static void premain(String args, Instrumentation inst) throws IOException {
        final byte[] replacement;
        try (InputStream in = Agent.class.getClassLoader().getResourceAsStream(REPLACEMENT)) {
            if (in == null) {
                throw new IOException("mrl-oip agent: " + REPLACEMENT + " is missing from the jar");
            }
            replacement = in.readAllBytes();
        }
        inst.addTransformer(new Swap(replacement));
        System.err.println("mrl-oip agent: OIP model routes enabled (GET /v2/models/{m}, /v2/models/{m}/ready)");
        String batching = System.getProperty("mrl.batching", "torchserve");
        if ("greedy".equals(batching)) {
            inst.addTransformer(new Rewrite(GreedyBatching.TARGET, GreedyBatching::patch,
                    "greedy batching: a worker takes what is queued and never waits maxBatchDelay ("
                            + GreedyBatching.SITES + " queue polls of " + GreedyBatching.TARGET + ")",
                    "greedy batching NOT enabled, TorchServe's batching kept"));
        } else if (!"torchserve".equals(batching)) {
            System.err.println("mrl-oip agent: -Dmrl.batching=" + batching + " is neither greedy nor torchserve: "
                    + "TorchServe's batching kept");
        }
        String send = System.getProperty("mrl.send", "torchserve");
        if ("inline".equals(send)) {
            inst.addTransformer(new Rewrite(InlineSend.TARGET, InlineSend::patch,
                    "inline send: a worker thread writes its batch to its worker itself, no thread started"
                            + " for it (" + InlineSend.SITES + " runAsync call of " + InlineSend.TARGET + ")",
                    "inline send NOT enabled, TorchServe's runAsync kept"));
        } else if (!"torchserve".equals(send)) {
            System.err.println("mrl-oip agent: -Dmrl.send=" + send + " is neither inline nor torchserve: "
                    + "TorchServe's runAsync kept");
        }
    }

    /** One class of TorchServe rewritten as the JVM loads it; the class as it is where that fails. */
    static final class Rewrite implements ClassFileTransformer {
        private final String target;
        private final UnaryOperator<byte[]> patch;
        private final String enabled;
        private final String kept;

        Rewrite(String target, UnaryOperator<byte[]> patch, String enabled, String kept) {
            this.target = target;
            this.patch = patch;
            this.enabled = enabled;
            this.kept = kept;
        }

        @Override
        public byte[] transform(ClassLoader loader, String className, Class<?> redefined,
                                ProtectionDomain domain, byte[] original) {
            if (!target.equals(className) || redefined != null) {
                return null;
            }
            try {
                byte[] patched = patch.apply(original);
                System.err.println("mrl-oip agent: " + enabled);
                return patched;
            } catch (RuntimeException e) { // the JVM would drop it silently: say so, keep the class
                System.err.println("mrl-oip agent: " + kept + ": " + e);
                return null;
            }
        }
    }

    /** Returns our class's bytes for the target class, nothing (no change) for every other. */
    static final class Swap implements ClassFileTransformer {
        private final byte[] replacement;

        Swap(byte[] replacement) {
            this.replacement = replacement;
        }

        @Override
        public byte[] transform(ClassLoader loader, String className, Class<?> redefined,
                                ProtectionDomain domain, byte[] original) {
            return TARGET.equals(className) && redefined == null ? replacement.clone() : null;
        }
    }
}
